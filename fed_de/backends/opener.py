"""The substratools opener every fed_de site registers on Substra.

Each data sample folder is one site (a CSV folder or one ``.h5ad``); a ``site.json`` in it may
name the site. It reads data with the loader the simulation uses (:func:`fed_de.site.load_site`).
"""

from __future__ import annotations

import json
from pathlib import Path

import substratools as tools

from fed_de.errors import SiteDataError
from fed_de.site import SITE_META, load_site


class FedDEOpener(tools.Opener):
    """substratools opener: each data sample folder is one site (CSV folder or one .h5ad).

    A ``site.json`` file in the folder may name the site (``{"name": "hospital_a"}``;
    otherwise the folder name is used) and the AnnData layer holding its raw counts
    (``"layer"``).
    """

    def get_data(self, folders):
        """Load the site held in the (single) data sample folder."""
        if len(folders) != 1:
            raise SiteDataError(
                f"fed_de expects one data sample folder per site, got {len(folders)}: {folders}"
            )
        folder = Path(folders[0])
        meta = {}
        if (folder / SITE_META).exists():
            meta = json.loads((folder / SITE_META).read_text())
        return load_site(folder, meta.get("name", folder.name), meta.get("layer"))

    def fake_data(self, n_samples=None):
        """Not supported: fed_de never runs on fake data."""
        raise NotImplementedError("fed_de does not use fake data")
