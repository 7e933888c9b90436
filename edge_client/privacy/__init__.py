"""Privacy on the phone: the transform that hides the feature, the local rerank that picks the answer, the answer cache."""
