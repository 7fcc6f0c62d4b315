"""Server-side algorithms for Pollen, each a small composable part."""
