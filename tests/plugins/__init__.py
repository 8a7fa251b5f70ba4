"""Plugin wheels built on the fly for upload and discovery tests."""
