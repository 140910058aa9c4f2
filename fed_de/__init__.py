"""fed_de: federated differential expression whose answer equals the pooled DESeq2 analysis."""

from fed_de.design import Study, make_study

__version__ = "0.1.0"

__all__ = ["Study", "make_study", "__version__", "deseq2", "size_factors", "screen",
           "FitWarning"]


def __getattr__(name):
    # Lazy: importing the package must stay cheap on every node.
    if name in ("deseq2", "size_factors"):
        from fed_de import api

        return getattr(api, name)
    if name == "FitWarning":
        from fed_de.errors import FitWarning

        return FitWarning
    if name == "screen":
        from fed_de.screening import api

        return api.screen
    raise AttributeError(f"module 'fed_de' has no attribute {name!r}")
