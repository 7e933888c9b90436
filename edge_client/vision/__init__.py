"""Seeing: a photo or camera frame becomes the model's input, a TFLite interpreter turns it into a feature."""
