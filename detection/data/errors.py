"""The error every malformed dataset file (annotation JSON or image) raises."""

__all__ = ["DatasetError"]


class DatasetError(ValueError):
    """A dataset file (annotation JSON or image) is malformed or inconsistent."""
