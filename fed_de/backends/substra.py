"""Run a fed_de strategy on real Substra: the subprocess backend here, or a remote network.

The strategy is the one the simulator runs, unchanged. Each site is an organisation that
registers its own dataset (fed_de's opener + one data sample folder) with its own client; the
aggregator is one more organisation. fed_de itself travels as a prebuilt wheel through
substrafl's ``Dependency`` with exact pins, not as a copy of the repository.

Remote networks: clients come from a credentials YAML; datasets are registered beforehand by
each hospital on its own node (``fed-de register-site``), which writes the keys the study
needs into a keys YAML.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import types
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from fed_de.backends.plan import record_plan
from fed_de.errors import FedDEError, RemoteError, SiteTaskError
from fed_de.site import SITE_META, SiteData

log = logging.getLogger("fed_de")
OPENER_SOURCE = "from fed_de.backends.opener import FedDEOpener  # noqa: F401\n"
PINNED = ("numpy", "scipy", "pandas", "anndata", "formulaic", "joblib", "typer", "rich", "numba")


def exact_pins() -> list[str]:
    """``name==version`` of the packages whose objects travel between nodes (this env)."""
    return [f"{name}=={version(name)}" for name in PINNED]


def build_wheel(dest: Path, source: Path | None = None) -> Path:
    """Build fed_de's wheel into ``dest`` (from the installed source tree)."""
    source = source or Path(__file__).resolve().parents[2]
    if not (source / "pyproject.toml").exists():
        raise FedDEError(f"cannot build the fed_de wheel: no pyproject.toml in {source}; "
                         "pass wheel= with a prebuilt fed_de wheel")
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(dest), str(source)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wheels = sorted(dest.glob("fed_de-*.whl"))
    if not wheels:
        raise FedDEError(f"building the fed_de wheel in {dest} produced no wheel")
    return wheels[-1]


def dependency(wheel: Path):
    """substrafl ``Dependency`` shipping the fed_de wheel with exact pins."""
    from substrafl.dependency import Dependency

    return Dependency(local_installable_dependencies=[wheel], pypi_dependencies=exact_pins())


def write_site_folder(site: SiteData, folder: Path) -> Path:
    """A data sample folder for one site: ``site.h5ad`` and ``site.json`` (its name)."""
    import anndata as ad

    folder.mkdir(parents=True, exist_ok=True)
    adata = ad.AnnData(X=site.counts, obs=site.obs)
    adata.var_names = list(site.genes)
    adata.obs_names = list(site.samples)
    adata.write_h5ad(folder / "site.h5ad")
    (folder / SITE_META).write_text(json.dumps({"name": site.name}))
    return folder


def write_opener(folder: Path, source: str = OPENER_SOURCE) -> tuple[Path, Path]:
    """The opener script and dataset description every site registers."""
    folder.mkdir(parents=True, exist_ok=True)
    opener, description = folder / "opener.py", folder / "description.md"
    opener.write_text(source)
    description.write_text("fed_de site: counts (samples x genes) and sample metadata.\n")
    return opener, description


def register_dataset(client, name: str, folder: Path, opener: Path, description: Path,
                     authorized_ids: list[str]) -> dict:
    """Register one site's dataset and data sample with that site's own client."""
    from substra.sdk.schemas import DataSampleSpec, DatasetSpec, Permissions

    perms = Permissions(public=False, authorized_ids=authorized_ids)
    dataset_key = client.add_dataset(DatasetSpec(
        name=f"fed_de-{name}", data_opener=opener, type="fed_de-site", description=description,
        permissions=perms, logs_permission=perms))
    sample_key = client.add_data_sample(
        DataSampleSpec(data_manager_keys=[dataset_key], path=folder), local=True)
    return {"dataset_key": dataset_key, "data_sample_keys": [sample_key]}


@dataclass
class SubstraRun:
    """What a substra run returns: the final shared state and the run facts."""

    shared_state: dict
    facts: dict
    compute_plan_key: str


def run_subprocess(strategy, sites: list[SiteData], *, workdir: Path,
                   wheel: Path | None = None, progress=None,
                   opener_source: str = OPENER_SOURCE, write_site=None) -> SubstraRun:
    """Execute ``strategy`` on substra's subprocess backend: real functions, datasets, tasks.

    One substra organisation per site plus the aggregator, each with its own client.
    Working files (site folders, wheel, experiment summary, substra's local worker) go under
    ``workdir``, which the caller may delete afterwards. ``opener_source`` and
    ``write_site(site, folder)`` let other kinds of site (screens) travel the same way.
    """
    write_site = write_site or write_site_folder
    import substra

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    wheel = wheel or build_wheel(workdir / "dist")
    opener, description = write_opener(workdir / "opener", opener_source)
    names = [s.name for s in sites]
    clients = {n: substra.Client(client_name=n, backend_type="subprocess")
               for n in [*names, "aggregator"]}
    orgs = {n: c.organization_info().organization_id for n, c in clients.items()}
    keys = {}
    for site in sites:
        folder = write_site(site, workdir / "sites" / site.name)
        keys[site.name] = register_dataset(clients[site.name], site.name, folder, opener,
                                           description, [orgs[site.name], orgs["aggregator"]])
    return _execute(strategy, clients["aggregator"], orgs, keys, workdir, wheel, started,
                    progress=progress)


def _execute(strategy, agg_client, orgs: dict, keys: dict, workdir: Path, wheel: Path,
             started: float, progress=None, poll_seconds: float = 5.0,
             timeout: float | None = None, download=None,
             attach: str | None = None) -> SubstraRun:
    from substrafl.experiment import execute_experiment
    from substrafl.model_loading import download_aggregate_shared_state
    from substrafl.nodes import AggregationNode, TrainDataNode

    download = download or download_aggregate_shared_state
    nodes = [TrainDataNode(organization_id=orgs[name], data_manager_key=k["dataset_key"],
                           data_sample_keys=list(k["data_sample_keys"]))
             for name, k in keys.items()]
    plan = record_plan(strategy, [orgs[n] for n in keys], orgs["aggregator"])
    if attach is not None:  # reattach to a plan submitted before: submit nothing
        cp = attach_plan(agg_client, attach, len(plan.tasks))
    elif progress is not None:
        progress("submitting compute plan", orgs["aggregator"], 0)
    try:
        if attach is None:
            cp = execute_experiment(
                client=agg_client, strategy=strategy, train_data_nodes=nodes,
                aggregation_node=AggregationNode(orgs["aggregator"]),
                experiment_folder=workdir / "experiment", dependencies=dependency(wheel),
                clean_models=False, name=f"fed_de-{type(strategy).__name__}")
    except Exception as err:
        # the subprocess backend runs the plan while submitting it: a task that fails there
        # raises substra's ExecutionError, which names no task; find the failed one
        if type(err).__name__ != "ExecutionError":
            raise
        failed = _failure(agg_client, None, "failed", plan, {v: k for k, v in orgs.items()})
        failed.facts = {**plan.facts(), "wall_seconds": round(time.perf_counter() - started, 3)}
        _attach_seed(failed, agg_client, strategy, orgs["aggregator"], download)
        raise failed from err
    log.info("compute plan %s", cp.key)
    if progress is not None and attach is None:  # printed, so that a user can reattach
        progress(f"submitted compute plan {cp.key}", orgs["aggregator"], 0)
    try:
        wait_for(agg_client, cp.key, plan_tasks=len(plan.tasks), progress=progress,
                 poll_seconds=poll_seconds, timeout=timeout, plan=plan,
                 names={v: k for k, v in orgs.items()})
        state = download(client=agg_client, compute_plan_key=cp.key,
                         round_idx=plan.final_round)
    except Exception as err:  # what is known so far travels with the error (run.json)
        err.facts = {**plan.facts(), **(getattr(err, "facts", None) or {}),
                     "compute_plan_key": cp.key,
                     "wall_seconds": round(time.perf_counter() - started, 3)}
        if isinstance(err, SiteTaskError):  # a failed task: what a new plan resumes from
            _attach_seed(err, agg_client, strategy, orgs["aggregator"], download, cp.key)
        raise
    names = {v: k for k, v in orgs.items()}
    facts = run_facts(plan, measure_outputs(agg_client, cp.key, orgs["aggregator"]), names)
    facts.update(wall_seconds=round(time.perf_counter() - started, 3), compute_plan_key=cp.key)
    return SubstraRun(shared_state=state, facts=facts, compute_plan_key=cp.key)


def _attach_seed(err: BaseException, client, strategy, aggregator_org: str, download,
                 key: str | None = None) -> None:
    """Download, while the failed plan is reachable, the seed a new plan resumes from
    (:mod:`fed_de.backends.resume`) and attach it to ``err`` as ``err.resume`` (None, with
    ``err.resume_error`` saying why, when there is none)."""
    from fed_de.backends.resume import download_seed

    key = key or (getattr(err, "facts", None) or {}).get("compute_plan_key") or _plan_key(err)
    err.resume, err.resume_error = None, None
    if key is None:  # the subprocess backend's failure may not name its plan: the newest
        try:
            plans = sorted(client.list_compute_plan(), key=lambda p: str(p.creation_date))
            key = plans[-1].key if plans else None
        except Exception:  # noqa: BLE001 - best effort
            key = None
    if key is None:
        err.resume_error = "the failed compute plan's key is unknown"
        return
    try:
        err.resume = download_seed(client, key, strategy, aggregator_org,
                                   download=download if download is not None else None)
    except Exception as why:  # noqa: BLE001 - resuming is offered, never required
        err.resume_error = f"{type(why).__name__}: {why}"


def _plan_key(err: BaseException) -> str | None:
    text = str(err)
    if text.startswith("compute plan ") and text.split()[2] != "None":
        return text.split()[2]
    return None


def run_facts(plan, measured: dict | None, names: dict) -> dict:
    """A substra run's facts: the plan's steps and tasks, and the bytes measured from the
    stored outputs, or (when they cannot be read) the plan's declared upper bounds, labelled
    so (``bytes_measured: False``)."""
    facts = plan.facts()
    bounds = facts.pop("bytes_upper_bound_by_site")
    payload_bounds = facts.pop("payload_bytes_upper_bound_by_site")
    note = facts.pop("bytes_note")
    if measured is not None:
        facts.update(measured, bytes_measured=True,
                     bytes_note="measured: sizes of the shared outputs substra stored "
                                "(pickled; masked under secure aggregation); payload = their "
                                "plaintext float64 values")
    else:
        facts.update(bytes_sent_by_site=bounds, payload_bytes_by_site=payload_bounds,
                     bytes_sent_by_aggregator=None, bytes_measured=False, bytes_note=note)
    for key in ("bytes_sent_by_site", "payload_bytes_by_site"):
        facts[key] = {names.get(k, k): v for k, v in facts[key].items()}
    return facts


def measure_outputs(client, compute_plan_key: str, aggregator_org: str) -> dict | None:
    """Bytes of the shared outputs substra stored for a plan, read from their files (the
    subprocess backend keeps them on this machine). None when they are not local files (a
    remote network: they are not downloaded just to be weighed) or cannot be listed."""
    import pickle

    from fed_de.backends.simulation import payload_nbytes

    sent: dict[str, int] = {}
    payload: dict[str, int] = {}
    aggregator = 0
    try:
        tasks = client.list_task(filters={"compute_plan_key": [compute_plan_key]})
        for task in tasks:
            for out in client.list_task_output_assets(task.key):
                if str(getattr(out, "identifier", "")) != "shared":
                    continue
                address = getattr(out.asset, "address", None)
                path = Path(str(address.storage_address)) if address is not None else None
                if path is None or not path.is_file():
                    return None
                size = path.stat().st_size
                if task.worker == aggregator_org:
                    aggregator += size
                    continue
                with path.open("rb") as fh:
                    values = payload_nbytes(pickle.load(fh))
                sent[task.worker] = sent.get(task.worker, 0) + size
                payload[task.worker] = payload.get(task.worker, 0) + values
    except Exception:  # noqa: BLE001 - weighing outputs is best effort; bounds are reported
        return None
    if not sent:
        return None
    return {"bytes_sent_by_site": sent, "payload_bytes_by_site": payload,
            "bytes_sent_by_aggregator": aggregator}


def wait_for(client, compute_plan_key: str, *, plan_tasks: int, progress=None,
             poll_seconds: float = 5.0, timeout: float | None = None,
             retries: int = 5, sleep=time.sleep, plan=None, names: dict | None = None
             ) -> None:
    """Poll a compute plan until it ends; raise naming the failed task, its site and step
    (``plan``, ``names``: see :func:`_failure`).

    A transient error while polling (connection lost, time-out, 502/503/504, 500) is retried
    ``retries`` times in a row with back-off (``poll_seconds`` doubled each time, at most 5
    minutes); the plan keeps running on the network meanwhile.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        cp = poll_with_retries(client, compute_plan_key, retries=retries,
                               first_wait=poll_seconds, sleep=sleep)
        # enum (ComputePlanStatus.done) or raw value (PLAN_STATUS_DONE) -> "done"
        status = str(getattr(cp, "status", "")).split(".")[-1].lower()
        status = status.replace("plan_status_", "")
        if progress is not None:
            done = getattr(cp, "done_count", None)
            progress(f"compute plan {status} ({done}/{plan_tasks} tasks)", "substra", 0)
        if status == "done":
            return
        if "fail" in status or "cancel" in status:
            raise _failure(client, compute_plan_key, status, plan, names)
        if deadline is not None and time.monotonic() > deadline:
            raise FedDEError(f"compute plan {compute_plan_key} still {status} after "
                             f"{timeout:.0f} s; it keeps running on the network (follow it "
                             f"with fed-de status {compute_plan_key})")
        sleep(poll_seconds)


def plan_status(client, compute_plan_key: str, *, retries: int = 5, sleep=time.sleep
                ) -> dict:
    """Where a submitted compute plan stands (``fed-de status``).

    Returns
    -------
    dict
        ``key``, ``status`` (``doing``, ``done``, ``failed``, ...), ``done`` and ``total``
        task counts where the node reports them, and for a failed plan ``failed``: the
        first failed task's message (task, function, organisation).
    """
    cp = poll_with_retries(client, compute_plan_key, retries=retries, sleep=sleep)
    status = str(getattr(cp, "status", "")).split(".")[-1].lower().replace("plan_status_", "")
    out = {"key": compute_plan_key, "status": status,
           "done": getattr(cp, "done_count", None), "total": getattr(cp, "task_count", None)}
    if "fail" in status or "cancel" in status:
        out["failed"] = str(_failure(client, compute_plan_key, status))
    return out


def transient(err: BaseException) -> bool:
    """Whether a substra client error may pass if tried again (network or gateway trouble)."""
    from substra.sdk import exceptions as sx

    return isinstance(err, sx.ConnectionError | sx.Timeout | sx.GatewayUnavailable
                      | sx.InternalServerError | sx.RequestTimeout)


def poll_with_retries(client, compute_plan_key: str, *, retries: int = 5,
                      first_wait: float = 5.0, sleep=time.sleep):
    """``client.get_compute_plan(key)``, retrying transient errors with back-off.

    Parameters
    ----------
    retries
        Transient errors tolerated in a row; the next one is raised.
    first_wait
        Seconds before the first retry; doubled for each next one (at most 300).
    sleep
        The waiting function (tests pass a recorder).
    """
    wait = max(float(first_wait), 0.0)
    for attempt in range(retries + 1):
        try:
            return client.get_compute_plan(compute_plan_key)
        except Exception as err:
            if not transient(err) or attempt == retries:
                raise
            log.warning("polling compute plan %s: %s; retrying in %.0f s (%d/%d)",
                        compute_plan_key, type(err).__name__, wait, attempt + 1, retries)
            sleep(wait)
            wait = min(max(2 * wait, 1.0), 300.0)
    raise AssertionError("unreachable")  # pragma: no cover


def attach_plan(client, compute_plan_key: str, n_tasks: int):
    """The compute plan ``key`` on the network, to wait for and download (``attach``).

    Raises
    ------
    FedDEError
        The node reports a task count other than this study's plan's ``n_tasks`` (another
        study, or other options).
    """
    cp = poll_with_retries(client, compute_plan_key)
    total = getattr(cp, "task_count", None)
    if isinstance(total, int) and total != n_tasks:
        raise FedDEError(f"compute plan {compute_plan_key} has {total} tasks, this study's "
                         f"plan {n_tasks}: reattach with the design, levels, genes and "
                         "options of the run that submitted it")
    return types.SimpleNamespace(key=compute_plan_key, status=getattr(cp, "status", None))


def _failure(client, key: str | None, status: str, plan=None,
             names: dict | None = None) -> SiteTaskError:
    """The error of a failed plan, naming its first failed task, the site (``names``: an
    organisation's site name) and the step (the ``plan`` record's step of that site and
    round; else the registered function's name). ``key`` None: the plan substra's
    subprocess backend was running when a task raised; that backend leaves the task that
    raised in ``STATUS_EXECUTING`` (its in-memory database, shared by every client of the
    process, is where it is found, among the tasks of this run's organisations:
    ``names``)."""
    filters = {"status": ["STATUS_FAILED"]}
    if key is not None:
        filters["compute_plan_key"] = [key]
    try:
        tasks = client.list_task(filters=filters)
        if not tasks:  # the local backends match a status filter against str(enum): never
            every = client.list_task(filters={k: v for k, v in filters.items()
                                              if k != "status"})
            wanted = ("STATUS_FAILED",) if key is not None else ("STATUS_FAILED",
                                                                  "STATUS_EXECUTING")
            tasks = [t for t in every if (st := getattr(t, "status", None)) is not None
                     and str(getattr(st, "value", st)) in wanted
                     and (not names or getattr(t, "worker", None) in names)]  # this run's
    except Exception:  # noqa: BLE001 - best effort: the error message is what matters
        tasks = []
    if not tasks:
        return SiteTaskError(f"compute plan {key} ended with status {status}",
                             site="unknown", step="unknown")
    task = tasks[0] if key is not None else tasks[-1]  # (the last one this client ran)
    key = key or getattr(task, "compute_plan_key", None)
    site, step = _locate(task, plan, names or {})
    worker = getattr(task, "worker", "unknown")
    where = f"site {site} (organisation {worker})" if site != worker else \
        f"organisation {worker}"
    r = _task_round(task)
    at = f"{step}, round {r}" if r is not None else step
    return SiteTaskError(f"compute plan {key} {status}: task {task.key} ({at}) failed at "
                         f"{where}; see its logs with substra's client.get_logs(task_key)",
                         site=site, step=step)


def _task_round(task) -> int | None:
    value = (getattr(task, "metadata", None) or {}).get("round_idx")
    return int(value) if value not in (None, "", "None") else None


def _locate(task, plan, names: dict) -> tuple[str, str]:
    """The site name and the fed_de step of a substra task (the plan record's steps of its
    organisation and round; the registered function's name when the record has none)."""
    worker = str(getattr(task, "worker", "unknown"))
    step = getattr(getattr(task, "function", None), "name", "unknown")
    if plan is not None:
        r = _task_round(task)
        steps = sorted({t.method for t in plan.tasks if t.worker == worker and t.round_idx == r})
        step = " or ".join(steps) or step
    return names.get(worker, worker), step


# -- remote networks ----------------------------------------------------------------------
def _load_yaml(source) -> dict:
    import yaml

    if isinstance(source, dict):
        return source
    path = Path(source)
    if not path.exists():
        raise FedDEError(f"{path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise FedDEError(f"{path} must hold a mapping")
    return data


#: What the credentials template (examples/remote/credentials.yaml) holds until filled in.
PLACEHOLDERS = ("REPLACE", "example.org", "example.com")


def check_credentials_entry(entry: dict, name: str) -> None:
    """Refuse, before connecting, a credentials entry without a url and a token or a
    username + password, or one still holding the template's placeholders."""
    if not isinstance(entry, dict) or not entry.get("url"):
        raise FedDEError(f"credentials for {name!r} lack 'url' (the Substra API of that "
                         "organisation)")
    for key in ("url", "token", "username", "password"):
        value = str(entry.get(key) or "")
        if any(p in value for p in PLACEHOLDERS):
            raise FedDEError(
                f"credentials for {name!r}: {key} is still the template's placeholder "
                f"({value!r}); put the real value from your Substra node before connecting")
    if not entry.get("token") and not (entry.get("username") and entry.get("password")):
        raise FedDEError(f"credentials for {name!r} need 'token' or 'username' and 'password'")


@contextmanager
def remote_errors(org: str, url: str | None, doing: str = "talking to"):
    """Turn substra's network, authentication and permission errors into one
    :class:`~fed_de.errors.RemoteError` naming the organisation, the node URL and the fix."""
    try:
        yield
    except FedDEError:
        raise
    except Exception as err:
        polite = remote_error(err, org, url, doing)
        if polite is None:
            raise
        raise polite from err


def remote_error(err: BaseException, org: str, url: str | None,
                 doing: str = "talking to") -> RemoteError | None:
    """The one-line error of a substra client error (None: not a network error)."""
    from substra.sdk import exceptions as sx

    where = f"{doing} organisation {org!r} at {url or 'its node'}"
    status = getattr(err, "status_code", None)
    code = f" (HTTP {status})" if status else ""
    if isinstance(err, sx.AuthenticationError | sx.BadLoginException):
        fix = ("the token expired or the username/password is wrong: generate a new token "
               "on that node's web frontend and put it under 'token' in the credentials file")
    elif isinstance(err, sx.UsernamePasswordLoginDisabledException):
        fix = ("that node accepts tokens only: generate one on its web frontend and put it "
               "under 'token' in the credentials file")
    elif isinstance(err, sx.AuthorizationError):
        fix = ("this user may not do that there: ask that organisation's admin to grant the "
               "user access, or check that the dataset was registered with --aggregator-org "
               "naming this organisation")
    elif isinstance(err, sx.ConnectionError | sx.Timeout):
        fix = ("the node cannot be reached: check the url in the credentials file, your "
               "network or VPN, and that the node is up (ask its admin)")
    elif isinstance(err, sx.GatewayUnavailable | sx.InternalServerError | sx.RequestTimeout):
        fix = "the node is down or overloaded: try again later, or ask its admin"
    elif isinstance(err, sx.NotFound):
        fix = ("the node does not know that key: check the keys file (fed-de register-site "
               "writes it) or the compute plan key")
    elif isinstance(err, sx.BadConfiguration | sx.ConfigurationInfoError):
        fix = "check the url and the options of that entry of the credentials file"
    else:
        return None
    detail = str(getattr(err, "msg", "") or err).strip().splitlines()
    first = detail[0][:200] if detail else ""
    polite = RemoteError(f"{where}: {type(err).__name__}{code}: {first}; {fix}", org=org,
                         url=url, step=doing)
    polite.facts = dict(getattr(err, "facts", None) or {})
    return polite


def make_client(entry: dict, name: str):
    """substra client for one organisation of a credentials YAML entry.

    ``entry``: ``url`` and either ``token`` or ``username`` + ``password``; optional
    ``insecure: true`` for self-signed test networks.
    """
    import substra

    check_credentials_entry(entry, name)
    kwargs = {"url": entry["url"], "backend_type": "remote", "client_name": name,
              "insecure": bool(entry.get("insecure", False))}
    if entry.get("token"):
        kwargs["token"] = entry["token"]
    elif entry.get("username") and entry.get("password"):
        kwargs.update(username=entry["username"], password=entry["password"])
    else:
        raise FedDEError(f"credentials for {name!r} need 'token' or 'username' and 'password'")
    with remote_errors(name, entry["url"], "connecting to"):
        return substra.Client(**kwargs)


def register_site_remote(client, name: str, site_folder: Path, aggregator_org: str,
                         keys_file: Path | None = None, workdir: Path | None = None,
                         kind: str = "deseq2", layer: str | None = None) -> dict:
    """What ``fed-de register-site`` does on a hospital's own node; returns its keys entry.

    The site's data sample folder is uploaded to the hospital's own node only; the dataset is
    readable by the hospital and the aggregator organisation (which runs no data task on it).
    ``kind="screen"`` registers the screen opener (one ``.h5ad`` of cells in the folder).
    ``layer`` names the AnnData layer of raw counts (recorded in the folder's ``site.json``).
    """
    import yaml

    workdir = Path(workdir or site_folder.parent / ".fed_de")
    if kind == "screen":
        from fed_de.screening.data import SCREEN_OPENER_SOURCE

        source = SCREEN_OPENER_SOURCE
        h5 = sorted(site_folder.glob("*.h5ad"))
        if len(h5) != 1:
            raise FedDEError(f"site {name!r}: a screen site folder holds one .h5ad, found "
                             f"{len(h5)} in {site_folder}")
        if h5[0].name != "site.h5ad":
            raise FedDEError(f"site {name!r}: name the file site.h5ad (found {h5[0].name})")
    elif kind == "deseq2":
        source = OPENER_SOURCE
    else:
        raise FedDEError(f"kind must be 'deseq2' or 'screen', not {kind!r}")
    opener, description = write_opener(workdir / "opener", source)
    meta = site_folder / SITE_META
    if not meta.exists() or layer is not None:
        # the opener reads the site's name, and the AnnData layer of raw counts, from here
        meta.write_text(json.dumps({"name": name, **({"layer": layer} if layer else {})}))
    org = client.organization_info().organization_id
    entry = {"organization_id": org,
             **register_dataset(client, name, site_folder, opener, description,
                                [org, aggregator_org])}
    if keys_file is not None:
        keys = _load_yaml(keys_file) if Path(keys_file).exists() else {}
        keys.setdefault("aggregator_organization", aggregator_org)
        keys.setdefault("sites", {})[name] = entry
        Path(keys_file).write_text(yaml.safe_dump(keys, sort_keys=False))
    return entry


def run_remote(strategy, credentials, keys, *, workdir: Path, submitter: str = "aggregator",
               wheel: Path | None = None, timeout: float | None = None,
               poll_seconds: float = 10.0, progress=None, client_factory=None,
               download=None, attach: str | None = None) -> SubstraRun:
    """Submit ``strategy`` to a remote Substra network and wait for its result.

    Parameters
    ----------
    credentials
        YAML path or dict: organisation name -> {url, token | username + password}; the
        ``submitter`` entry's client submits the plan and downloads the result.
    keys
        YAML path or dict written by ``fed-de register-site``: ``aggregator_organization``
        and ``sites`` -> {name: {organization_id, dataset_key, data_sample_keys}}.
    attach
        The key of a compute plan submitted before for the same study and options (printed
        at its submission): wait for it and download its result, submitting nothing.
    """
    creds, keys = _load_yaml(credentials), _load_yaml(keys)
    if submitter not in creds:
        raise FedDEError(f"credentials have no entry {submitter!r} (entries: {list(creds)})")
    sites = keys.get("sites") or {}
    if not sites or "aggregator_organization" not in keys:
        raise FedDEError("the keys file needs 'aggregator_organization' and at least one site "
                         "under 'sites' (write it with fed-de register-site)")
    for name, k in sites.items():
        missing = [f for f in ("organization_id", "dataset_key", "data_sample_keys")
                   if not k.get(f)]
        if missing:
            raise FedDEError(f"keys of site {name!r} lack {missing}")
    check_credentials_entry(creds[submitter], submitter)
    url = creds[submitter].get("url")
    with remote_errors(submitter, url, "connecting to"):
        client = (client_factory or make_client)(creds[submitter], submitter)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if attach is None:  # only a new submission ships the wheel
        wheel = wheel or build_wheel(workdir / "dist")
    orgs = {name: k["organization_id"] for name, k in sites.items()}
    orgs["aggregator"] = keys["aggregator_organization"]
    with remote_errors(submitter, url):
        return _execute(strategy, client, orgs,
                        {n: {"dataset_key": k["dataset_key"],
                             "data_sample_keys": list(k["data_sample_keys"])}
                         for n, k in sites.items()},
                        workdir, wheel, started, progress=progress,
                        poll_seconds=poll_seconds, timeout=timeout, download=download,
                        attach=attach)
