"""yolact-d2."""
