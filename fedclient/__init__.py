"""Pollen's ClientApp side: local training, device choice and update encoding."""
