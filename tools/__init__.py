"""Developer and researcher tools: model preparation, evaluation, benchmarks."""
