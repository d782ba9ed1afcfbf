"""Readers for each input kind (images, masks, generated datasets)."""
