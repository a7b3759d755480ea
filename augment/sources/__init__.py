"""Readers that yield :class:`~augment.sources.base.Sample` records."""

from .base import RejectedInput, Sample, Source

__all__ = ["RejectedInput", "Sample", "Source", "build_source"]


def build_source(name: str, **kwargs) -> Source:
    """Instantiate a source by its command-line name."""
    if name == "synthetic":
        from .synthetic import build_synthetic

        return build_synthetic(**kwargs)
    if name == "folder":
        from .folder import ImageFolderSource

        return ImageFolderSource(**kwargs)
    if name == "bgchallenge":
        from .bgchallenge import BackgroundChallengeSource

        return BackgroundChallengeSource(**kwargs)
    if name == "hardimagenet":
        from .hardimagenet import HardImageNetSource

        return HardImageNetSource(**kwargs)
    if name == "hub":
        from .hub import HubSource

        return HubSource(**kwargs)
    raise ValueError(
        f"unknown source {name!r}; choose one of: synthetic, folder, bgchallenge, hardimagenet, hub"
    )
