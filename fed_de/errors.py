"""Errors fed_de raises. Each message names the site, the sample(s) or gene(s), and the fix."""


class FedDEError(Exception):
    """Base class of fed_de's errors."""


class DesignError(FedDEError, ValueError):
    """The design formula, the declared levels, or a site's covariates are wrong."""


class SiteDataError(FedDEError, ValueError):
    """A site's counts or metadata cannot be used as they are."""


class NoCommonGeneError(SiteDataError):
    """Median-of-ratios needs a gene expressed in every sample; none is."""


class DisclosureError(FedDEError):
    """A site refuses to send a message that could disclose individual samples."""


class MessageSchemaError(DisclosureError):
    """A message does not match its declared schema and is not sent."""


class SiteTaskError(FedDEError, RuntimeError):
    """A task failed at a site or at the aggregator; the run stops."""

    def __init__(self, message: str, *, site: str, step: str, facts: dict | None = None):
        super().__init__(message)
        self.site = site
        self.step = step
        self.facts = facts or {}


class RemoteError(FedDEError):
    """A Substra node could not be reached, refused the credentials or the request."""

    def __init__(self, message: str, *, org: str, url: str | None, step: str = "connect"):
        super().__init__(message)
        self.site = org
        self.org = org
        self.url = url
        self.step = step
        self.facts: dict = {}


class FitWarning(UserWarning):
    """Something about the fit a user should know: the dispersion trend fell back to another
    type, genes did not converge, Cook's step filtered or refitted genes."""
