"""The distributed system: storage, Ray Data stages, Ray Train loop, reports."""
