"""fed_de's wheel installs into a fresh virtual environment with the exact pins a Substra node
uses, and runs an analysis there (what the Docker image does, without a Docker daemon)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from fed_de.backends.substra import build_wheel, exact_pins


def test_wheel_installs_with_exact_pins_and_runs(tmp_path):
    wheel = build_wheel(tmp_path / "dist")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    pins = exact_pins()
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel), *pins], check=True,
                   timeout=900)
    script = textwrap.dedent("""
        import importlib.metadata as md, json, numpy as np, fed_de
        from fed_de.demo_data import make_demo_study
        study = make_demo_study(n_samples=150, n_genes=60, seed=2)
        res = fed_de.deseq2(study.sites, study.design, levels=study.levels, genes=study.genes,
                            contrasts=[("condition", "B", "A")])
        table = res.results()
        print(json.dumps({"steps": res.facts["sequential_steps"],
                          "padj": table.padj.tolist(),
                          "versions": {p: md.version(p) for p in ("numpy", "pandas")}}))
    """)
    out = subprocess.run([str(python), "-c", script], check=True, capture_output=True,
                         text=True, cwd=tmp_path, timeout=600)
    import json

    facts = json.loads(out.stdout.strip().splitlines()[-1])
    # the same analysis in this checkout: same plan, same adjusted p-values
    import numpy as np

    import fed_de
    from fed_de.demo_data import make_demo_study

    study = make_demo_study(n_samples=150, n_genes=60, seed=2)
    here = fed_de.deseq2(study.sites, study.design, levels=study.levels, genes=study.genes,
                         contrasts=[("condition", "B", "A")])
    assert facts["steps"] == here.facts["sequential_steps"]
    padj = np.array(facts["padj"], dtype=float)
    assert np.isfinite(padj).sum() > 50
    np.testing.assert_allclose(padj, here.results().padj.to_numpy(), rtol=1e-9)
    for pin in pins:
        name, version = pin.split("==")
        if name in facts["versions"]:
            assert facts["versions"][name] == version
