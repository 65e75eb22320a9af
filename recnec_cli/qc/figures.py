"""The QC pictures: a study picture per study and, with ``--explain``, an explanation picture.

Geometry (see :mod:`recnec_cli.types`): volumes are canonical RAS+ arrays ``(X, Y, Z)`` with a
``(4, 4)`` voxel -> world (mm, RAS+) affine. Every panel is sampled from the volumes **by world
coordinates** (trilinear for images, nearest neighbour for masks), so volumes on different grids
(the common co-registration grid, a native T1ce when registration failed) land in the same place.
Panels follow the radiological convention:

=========  ================================  ==========================  ==================
view       plane                             viewer's left / right       top / bottom
=========  ================================  ==========================  ==================
axial      through the point, normal S       patient's Right / Left      Anterior / Posterior
coronal    normal A                          patient's Right / Left      Superior / Inferior
sagittal   normal R                          Anterior / Posterior        Superior / Inferior
=========  ================================  ==========================  ==================

and carry the letters R/L, A/P, S/I at their edges. All three planes pass through the lesion
centroid (the brain's centre of mass, or the field of view's centre, when no lesion was found).

Overlays are painted into the pixels with the exact colours below, without blending or
resampling (panels are placed with ``Figure.figimage``), so scripts and tests can find them. The
panel layout (pixel boxes, the world -> pixel mapping of each panel, label positions, the
intensity windows) is stored as JSON in the PNG's ``recnec-qc`` text chunk (:func:`read_layout`).

Intensity window of each greyscale panel: from the 0.5th percentile of the volume (background)
to the 99.5th percentile inside the brain mask (or of the upper half of the volume's intensities
when no brain mask lies on its grid): bright enough for the brain, not blown out by fat or vessels.

Rows: T1, T2, T1ce, then FLAIR when the study has one on the common grid (a fourth, optional
role: the segmenter reads it, the model does not), then the registration check. The segmenter's
T2/FLAIR hyperintensity (oedema) is outlined on every anatomical row.

Registration check: edges (Sobel gradient magnitude of the windowed, Gaussian-smoothed (1 px)
slice, above the 88th percentile of the slice's head pixels) of the T1 (cyan) and the T2
(magenta) over the T1ce; where both coincide the pixel is orange. Aligned series give orange
contours; a shifted series gives parallel cyan and magenta lines. The rigid offsets the
registration reported are printed beside the row.
"""

from __future__ import annotations

import io
import json
import logging
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from ..atomic import atomic_write_bytes

log = logging.getLogger(__name__)

# ---- exact overlay colours (RGB, 0-255) -----------------------------------------------------
LESION_RGB = (255, 0, 0)
BRAIN_RGB = (0, 220, 0)
BOX_RGB = (0, 128, 255)
T1_EDGE_RGB = (0, 255, 255)
T2_EDGE_RGB = (255, 0, 255)
BOTH_EDGES_RGB = (255, 140, 0)
LABEL_RGB = (255, 255, 0)
#: the segmenter's T2/FLAIR hyperintensity (oedema) connected to the lesion
OEDEMA_RGB = (190, 90, 255)
BACKGROUND_RGB = (16, 16, 16)
TEXT_RGB = (235, 235, 235)

# ---- layout (pixels; the PNG is written at DPI, so 1 figure pixel = 1 PNG pixel) -----------
PANEL_PX = 200
GAP_PX = 6
ROW_LABEL_PX = 86
SIDE_PX = 250
HEADER_PX = 50
#: the second header line (probability, spread, label) is drawn after inference, in this band
RESULT_BAND_PX = (27, 48)
FOOTER_PX = 26
DPI = 100
#: PNG text chunk holding the layout JSON
LAYOUT_KEY = "recnec-qc"
LAYOUT_FORMAT = "recnec-qc/1"

#: explanation maps: the colour scale never runs below this change of p(recurrence)
MIN_EXPLAIN_SCALE = 0.02
#: percentile of the gradient magnitude above which a pixel is an edge (registration row)
EDGE_PERCENTILE = 88.0

_AXIS_LETTERS = (("R", "L"), ("A", "P"), ("S", "I"))


@dataclass(frozen=True)
class View:
    """One plane: ``fixed`` world axis (0 R, 1 A, 2 S) held at the slice point, ``h`` the world
    axis along the panel's width (its positive direction towards the viewer's left), ``v`` the
    axis along its height (positive direction up)."""

    name: str
    fixed: int
    h: int
    v: int

    @property
    def labels(self) -> dict[str, str]:
        """Letter at each panel edge: ``{"left": "R", "right": "L", "top": "A", "bottom": "P"}``."""
        return {"left": _AXIS_LETTERS[self.h][0], "right": _AXIS_LETTERS[self.h][1],
                "top": _AXIS_LETTERS[self.v][0], "bottom": _AXIS_LETTERS[self.v][1]}


VIEWS = (View("axial", 2, 0, 1), View("coronal", 1, 0, 2), View("sagittal", 0, 1, 2))


@dataclass(eq=False)
class StudySnapshot:
    """What the stages of one study had made when it finished or failed (filled in by
    :func:`recnec_cli.orchestration.pipeline.preprocess_study`; nothing leaves the process).

    ``volumes``: role name (``"T1"``, ``"T2"``, ``"T1ce"``) -> converted native
    :class:`~recnec_cli.study.Volume`; ``grid_affine``: the common grid's ``(4, 4)`` voxel -> RAS mm
    affine; ``on_grid``: role name -> float32 ``(X, Y, Z)`` on that grid (T1 and T2 registered);
    ``brain`` / ``lesion``: bool ``(X, Y, Z)`` on that grid; ``oedema``: bool ``(X, Y, Z)`` on that
    grid, the segmenter's T2/FLAIR hyperintensity connected to the lesion (``None`` without a
    segmenter, a user mask or a lesion); ``lesion_centroid_ras_mm``: world mm;
    ``box_mm``: edge of the model-input box (mm) centred on the lesion; ``registration``: the
    per-role rigid offsets (``translation_mm``, ``rotation_deg``, ``brain_coverage``, ...).
    """

    volumes: dict[str, Any] = field(default_factory=dict)
    grid_affine: Any = None
    on_grid: dict[str, np.ndarray] = field(default_factory=dict)
    brain: np.ndarray | None = None
    lesion: np.ndarray | None = None
    oedema: np.ndarray | None = None
    lesion_centroid_ras_mm: tuple[float, float, float] | None = None
    box_mm: float | None = None
    registration: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """Nothing to draw (the study failed before any series was converted)."""
        return not self.volumes and not self.on_grid


@dataclass(frozen=True)
class QcPicture:
    """A written picture: ``path``, ``thumb`` (or ``None``) and its ``layout`` (the JSON stored in
    the PNG: ``panels`` with ``box_px`` ``[x0, y0, x1, y1]``, ``world_to_px`` (2 x 4: PNG pixel
    ``(x, y)`` = M @ ``(R, A, S, 1)`` in mm), ``labels`` (letter -> ``[x, y]``) ...)."""

    path: Path
    thumb: Path | None
    layout: Mapping[str, Any]


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Frame:
    centre_mm: np.ndarray  # (3,) world RAS+ centre of the field of view
    mm_per_px: float
    point_mm: np.ndarray  # (3,) the point all planes pass through


def _frame(shape: Sequence[int], affine: np.ndarray, point_mm: Sequence[float] | None) -> _Frame:
    """Field of view of a volume (its corner points' bounding box in world mm), one scale for all
    three views, and the slice point (``point_mm`` or the field of view's centre)."""
    aff = np.asarray(affine, dtype=np.float64)
    n = np.asarray(shape[:3], dtype=np.float64)
    corners = np.array([[i, j, k, 1.0] for i in (-0.5, n[0] - 0.5) for j in (-0.5, n[1] - 0.5)
                        for k in (-0.5, n[2] - 0.5)])
    world = (aff @ corners.T).T[:, :3]
    lo, hi = world.min(0), world.max(0)
    centre = (lo + hi) / 2.0
    mmpp = float(max(hi - lo)) / PANEL_PX
    point = centre if point_mm is None else np.asarray(point_mm, dtype=np.float64)
    return _Frame(centre, mmpp, point)


def _panel_world(frame: _Frame, view: View) -> np.ndarray:
    """World coordinates (mm, RAS+) of the pixel centres of a panel: ``(3, PANEL_PX, PANEL_PX)``
    indexed ``[axis, row, column]``."""
    off = (np.arange(PANEL_PX) + 0.5 - PANEL_PX / 2.0) * frame.mm_per_px
    w = np.empty((3, PANEL_PX, PANEL_PX))
    w[view.fixed] = frame.point_mm[view.fixed]
    w[view.h] = (frame.centre_mm[view.h] - off)[None, :]  # columns: towards the viewer's right
    w[view.v] = (frame.centre_mm[view.v] - off)[:, None]  # rows: downwards
    return w


def _world_to_px(frame: _Frame, view: View, x0: int, y0: int) -> list[list[float]]:
    """2 x 4 matrix M: PNG pixel ``(x, y)`` (continuous, pixel centres at +0.5) of world point
    ``(R, A, S, 1)``; the inverse of :func:`_panel_world` for points in the plane."""
    m = np.zeros((2, 4))
    m[0, view.h] = -1.0 / frame.mm_per_px
    m[0, 3] = x0 + PANEL_PX / 2.0 + frame.centre_mm[view.h] / frame.mm_per_px
    m[1, view.v] = -1.0 / frame.mm_per_px
    m[1, 3] = y0 + PANEL_PX / 2.0 + frame.centre_mm[view.v] / frame.mm_per_px
    return m.round(6).tolist()


def _sample(data: np.ndarray, affine: np.ndarray, world: np.ndarray, *, order: int,
            outside: float = np.nan) -> np.ndarray:
    """Sample ``data`` ``(X, Y, Z)`` (voxel -> RAS mm ``affine``) at ``world`` ``(3, H, W)``."""
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    pts = world.reshape(3, -1)
    vox = inv[:3, :3] @ pts + inv[:3, 3:4]
    out = ndimage.map_coordinates(np.asarray(data, dtype=np.float32), vox, order=order, mode="constant",
                                  cval=outside, prefilter=False)
    return out.reshape(world.shape[1:])


def volume_window(data: np.ndarray, brain: np.ndarray | None = None) -> tuple[float, float]:
    """Greyscale window ``(low, high)`` of a volume: 0.5th percentile of all voxels to the 99.5th
    percentile inside ``brain`` (bool, same grid), or of the voxels above the median when there is
    no brain mask on this grid. Always ``high > low``."""
    d = np.asarray(data, dtype=np.float32)
    flat = d[np.isfinite(d)]
    if flat.size == 0:
        return 0.0, 1.0
    sub = flat[:: max(1, flat.size // 2_000_000)]  # at most ~2 M voxels for the percentiles
    lo = float(np.percentile(sub, 0.5))
    if brain is not None and np.shape(brain) == d.shape and np.any(brain):
        inside = d[np.asarray(brain, dtype=bool)]
    else:
        inside = sub[sub > np.median(sub)]
    hi = float(np.percentile(inside, 99.5)) if inside.size else float(sub.max())
    if not hi > lo:
        hi = lo + 1.0
    return lo, hi


def _grey(img: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Windowed greyscale -> uint8 RGB ``(H, W, 3)``; pixels outside the volume (NaN) background."""
    lo, hi = window
    g = np.clip((np.nan_to_num(img, nan=lo) - lo) / (hi - lo), 0.0, 1.0)
    rgb = np.repeat((g * 255.0 + 0.5).astype(np.uint8)[..., None], 3, axis=-1)
    rgb[~np.isfinite(img)] = BACKGROUND_RGB
    return rgb


def _outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` pixels of its border."""
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return m
    return m & ~ndimage.binary_erosion(m, iterations=width, border_value=0)


def edge_map(img: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Edges of a slice (bool ``(H, W)``), Canny-style without hysteresis: the windowed slice is
    smoothed with a 1-pixel Gaussian, its Sobel gradient magnitude kept where it is at or above
    the :data:`EDGE_PERCENTILE` percentile of the head pixels (windowed value > 0.05) and a local
    maximum across the edge (non-maximum suppression, 4 directions), then widened to 3 pixels so
    that two series' edges at the same place overlap. NaN (outside the volume) is never an edge."""
    lo, hi = window
    valid = np.isfinite(img)
    g = np.clip((np.nan_to_num(img, nan=lo) - lo) / (hi - lo), 0.0, 1.0)
    g = ndimage.gaussian_filter(g, 1.0)
    gy, gx = ndimage.sobel(g, 0), ndimage.sobel(g, 1)
    mag = np.hypot(gx, gy)
    head = valid & (g > 0.05)
    if np.count_nonzero(head) < 50:
        return np.zeros(img.shape, dtype=bool)
    thr = max(float(np.percentile(mag[head], EDGE_PERCENTILE)), 1e-3)
    # non-maximum suppression: compare with the two neighbours along the gradient direction
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    sector = np.round(angle / 45.0).astype(int) % 4  # 0: along x, 1: diagonal, 2: along y, 3: anti-diagonal
    pad = np.pad(mag, 1)
    h, w = mag.shape
    nb = {0: ((0, 1), (0, -1)), 1: ((1, 1), (-1, -1)), 2: ((1, 0), (-1, 0)), 3: ((1, -1), (-1, 1))}
    keep = np.zeros(mag.shape, dtype=bool)
    for sct, ((dy1, dx1), (dy2, dx2)) in nb.items():
        a = pad[1 + dy1:1 + dy1 + h, 1 + dx1:1 + dx1 + w]
        b = pad[1 + dy2:1 + dy2 + h, 1 + dx2:1 + dx2 + w]
        keep |= (sector == sct) & (mag >= a) & (mag >= b)
    edges = keep & (mag >= thr) & ndimage.binary_erosion(valid, iterations=2)
    return ndimage.binary_dilation(edges, iterations=1)


def _paint(rgb: np.ndarray, where: np.ndarray, colour: tuple[int, int, int]) -> None:
    rgb[np.asarray(where, dtype=bool)] = colour


# ---------------------------------------------------------------------------------------------
# the figure canvas
# ---------------------------------------------------------------------------------------------
class _Canvas:
    """An RGB pixel canvas plus text items, rendered once with matplotlib (Agg)."""

    def __init__(self, width: int, height: int) -> None:
        self.w, self.h = int(width), int(height)
        self.rgb = np.empty((self.h, self.w, 3), dtype=np.uint8)
        self.rgb[:] = BACKGROUND_RGB
        self.texts: list[tuple[float, float, str, dict[str, Any]]] = []

    def paste(self, x0: int, y0: int, block: np.ndarray) -> None:
        h, w = block.shape[:2]
        self.rgb[y0:y0 + h, x0:x0 + w] = block

    def text(self, x: float, y: float, s: str, *, colour=TEXT_RGB, size: float = 9.0, ha: str = "left",
             va: str = "center", weight: str = "normal", fit_px: float | None = None) -> None:
        """Queue a text item; with ``fit_px`` its font shrinks until it is at most that wide (pixels)."""
        self.texts.append((x, y, s, dict(color=tuple(c / 255.0 for c in colour), fontsize=size, ha=ha, va=va,
                                         fontweight=weight, family="DejaVu Sans", fit_px=fit_px)))

    def render(self) -> np.ndarray:
        """The final RGB image ``(H, W, 3)`` uint8: the pixels, then the text drawn over them."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(self.w / DPI, self.h / DPI), dpi=DPI)
        fig.patch.set_facecolor(tuple(c / 255.0 for c in BACKGROUND_RGB))
        fig.figimage(self.rgb, xo=0, yo=0, origin="upper", resize=False)
        canvas = FigureCanvasAgg(fig)
        for x, y, s, kw in self.texts:
            kw = dict(kw)
            fit = kw.pop("fit_px", None)
            t = fig.text(x / self.w, 1.0 - y / self.h, s, **kw)
            if fit:
                width = t.get_window_extent(renderer=canvas.get_renderer()).width
                if width > fit:  # long UIDs and role lists: a smaller font, never a clipped line
                    t.set_fontsize(max(5.0, float(kw["fontsize"]) * fit / width * 0.97))
        canvas.draw()
        buf = np.asarray(canvas.buffer_rgba())
        return np.array(buf[:, :, :3])


def _png_bytes(rgb: np.ndarray, layout: Mapping[str, Any] | None) -> bytes:
    """PNG of ``rgb`` with the layout JSON as a text chunk; no time stamp (same input, same bytes)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if layout is not None:
        info.add_text(LAYOUT_KEY, json.dumps(layout, sort_keys=True, default=float))
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG", pnginfo=info, compress_level=6)
    return buf.getvalue()


def read_layout(path: Path) -> dict[str, Any]:
    """The layout JSON stored in a QC picture (see :class:`QcPicture`).

    Raises
    ------
    ValueError
        The PNG holds no recnec layout.
    """
    from PIL import Image

    with Image.open(path) as img:
        text = getattr(img, "text", {}).get(LAYOUT_KEY)
    if not text:
        raise ValueError(f"{Path(path).name} holds no {LAYOUT_KEY} layout")
    return json.loads(text)


def read_rgb(path: Path) -> np.ndarray:
    """A PNG as uint8 RGB ``(H, W, 3)``."""
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _labels(c: _Canvas, view: View, x0: int, y0: int) -> dict[str, list[float]]:
    """Draw the four orientation letters of a panel; return letter -> ``[x, y]`` (PNG pixels)."""
    lab = view.labels
    pos = {"left": (x0 + 9, y0 + PANEL_PX / 2), "right": (x0 + PANEL_PX - 9, y0 + PANEL_PX / 2),
           "top": (x0 + PANEL_PX / 2, y0 + 10), "bottom": (x0 + PANEL_PX / 2, y0 + PANEL_PX - 10)}
    out = {}
    for edge, (x, y) in pos.items():
        c.text(x, y, lab[edge], colour=LABEL_RGB, size=11, ha="center", va="center", weight="bold")
        out[lab[edge]] = [float(x), float(y)]
    return out


# ---------------------------------------------------------------------------------------------
# the study picture
# ---------------------------------------------------------------------------------------------
STUDY_ROWS = ("T1", "T2", "T1ce", "registration")
#: a study with a FLAIR on the common grid gets this row between the T1ce and the registration check
FLAIR_ROW = "FLAIR"


def study_layout_size(n_rows: int = len(STUDY_ROWS)) -> tuple[int, int]:
    """``(width, height)`` in pixels of a study picture of ``n_rows`` rows (4, or 5 with a FLAIR)."""
    w = ROW_LABEL_PX + 3 * (PANEL_PX + GAP_PX) + SIDE_PX
    h = HEADER_PX + n_rows * (PANEL_PX + GAP_PX) + FOOTER_PX
    return w, h


def panel_box(row: int, col: int) -> tuple[int, int, int, int]:
    """Pixel box ``(x0, y0, x1, y1)`` (x1, y1 exclusive) of the panel in ``row`` / ``col``."""
    x0 = ROW_LABEL_PX + col * (PANEL_PX + GAP_PX)
    y0 = HEADER_PX + row * (PANEL_PX + GAP_PX)
    return x0, y0, x0 + PANEL_PX, y0 + PANEL_PX


def _row_sources(snap: StudySnapshot) -> dict[str, tuple[np.ndarray, np.ndarray, str, np.ndarray | None] | None]:
    """Per role: ``(data, affine, what, brain on the same grid or None)`` of what can be drawn."""
    out: dict[str, Any] = {}
    for role in ("T1", "T2", "T1ce", FLAIR_ROW):
        if role in snap.on_grid and snap.grid_affine is not None:
            what = "registered\nonto the T1ce" if role != "T1ce" else "on the\ncommon grid"
            out[role] = (snap.on_grid[role], np.asarray(snap.grid_affine), what, snap.brain)
        elif role in snap.volumes:
            v = snap.volumes[role]
            what = "NOT registered\n(scanner\nalignment)" if role != "T1ce" else "native grid"
            out[role] = (np.asarray(v.data), np.asarray(v.affine), what, None)
        else:
            out[role] = None
    return out


def _fmt_reg(role: str, info: Mapping[str, Any] | None) -> str:
    if not info:
        return f"{role} -> T1ce: not registered"
    parts = [f"{role} -> T1ce: {float(info.get('translation_mm', float('nan'))):.2f} mm, "
             f"{float(info.get('rotation_deg', float('nan'))):.2f} deg"]
    if "brain_coverage" in info:
        parts.append(f"   brain coverage {100 * float(info['brain_coverage']):.1f} %")
    if "metric" in info:
        parts.append(f"   Mattes MI {float(info['metric']):.3f}")
    return "\n".join(parts)


def render_study(snap: StudySnapshot, path: Path, *, header: Sequence[str], name: str,
                 thumb: Path | None = None) -> QcPicture | None:
    """Draw and write the study picture of ``snap`` to ``path`` (and its T1ce axial panel to
    ``thumb``): rows T1, T2, T1ce, FLAIR when the study has one on the common grid (brain outline
    green, lesion red, T2/FLAIR hyperintensity (oedema) violet, model box blue) and the
    registration check (T1 / T2 edges over the T1ce, offsets beside it), columns axial, coronal,
    sagittal through the lesion centroid.

    Parameters
    ----------
    snap:
        What the stages made; a role that was never converted is drawn as "not available", a
        T1 / T2 that was not registered is drawn in scanner alignment and said so.
    header:
        One or two text lines for the top of the picture (pseudonymised id, roles, status); the
        second may be replaced after inference by :func:`stamp_result`.
    name:
        The study's QC name (:func:`recnec_cli.qc.files.qc_stem`), stored in the layout.

    Returns
    -------
    QcPicture or None
        ``None`` when nothing was converted (no pixels to show).
    """
    if snap.empty:
        return None
    sources = _row_sources(snap)
    ref = sources["T1ce"] or sources["T1"] or sources["T2"]
    if ref is None:
        return None
    point = snap.lesion_centroid_ras_mm
    if point is None and snap.brain is not None and snap.grid_affine is not None and np.any(snap.brain):
        com = np.array(ndimage.center_of_mass(snap.brain))
        point = tuple((np.asarray(snap.grid_affine)[:3, :3] @ com + np.asarray(snap.grid_affine)[:3, 3]).tolist())
    frame = _frame(np.shape(ref[0]), ref[1], point)
    roles = ("T1", "T2", "T1ce") + ((FLAIR_ROW,) if sources[FLAIR_ROW] is not None else ())
    w, h = study_layout_size(len(roles) + 1)
    c = _Canvas(w, h)
    for i, line in enumerate(list(header)[:2]):
        c.text(10, 16 + 21 * i, line, size=9.5, weight="bold" if i == 0 else "normal", fit_px=w - 20)
    layout: dict[str, Any] = {
        "format": LAYOUT_FORMAT, "kind": "study", "name": name, "size_px": [w, h],
        "slice_ras_mm": [round(float(v), 3) for v in frame.point_mm],
        "lesion_centroid_ras_mm": None if snap.lesion_centroid_ras_mm is None
        else [round(float(v), 3) for v in snap.lesion_centroid_ras_mm],
        "mm_per_px": round(frame.mm_per_px, 6), "header": list(header)[:2],
        "colours": {"lesion": LESION_RGB, "oedema": OEDEMA_RGB, "brain": BRAIN_RGB, "model_box": BOX_RGB,
                    "t1_edges": T1_EDGE_RGB, "t2_edges": T2_EDGE_RGB, "both_edges": BOTH_EDGES_RGB,
                    "labels": LABEL_RGB},
        "rows": {}, "panels": [], "registration": {k: dict(v) for k, v in snap.registration.items()},
    }
    worlds = {v.name: _panel_world(frame, v) for v in VIEWS}
    grid_masks: dict[str, dict[str, np.ndarray]] = {v.name: {} for v in VIEWS}
    for v in VIEWS:
        if snap.grid_affine is not None and snap.brain is not None:
            grid_masks[v.name]["brain"] = _sample(snap.brain, snap.grid_affine, worlds[v.name], order=0,
                                                  outside=0.0) > 0.5
        if snap.grid_affine is not None and snap.oedema is not None and np.any(snap.oedema):
            grid_masks[v.name]["oedema"] = _sample(snap.oedema, snap.grid_affine, worlds[v.name], order=0,
                                                   outside=0.0) > 0.5
        if snap.grid_affine is not None and snap.lesion is not None:
            grid_masks[v.name]["lesion"] = _sample(snap.lesion, snap.grid_affine, worlds[v.name], order=0,
                                                   outside=0.0) > 0.5
        if snap.lesion_centroid_ras_mm is not None and snap.box_mm:
            wv, cen, half = worlds[v.name], np.asarray(snap.lesion_centroid_ras_mm), snap.box_mm / 2.0
            grid_masks[v.name]["box"] = ((np.abs(wv[v.h] - cen[v.h]) <= half) & (np.abs(wv[v.v] - cen[v.v]) <= half))
    slices: dict[str, dict[str, np.ndarray]] = {}
    windows: dict[str, tuple[float, float]] = {}
    for ri, role in enumerate(roles):
        src = sources[role]
        y_mid = panel_box(ri, 0)[1] + PANEL_PX / 2
        c.text(8, y_mid - 8, role, size=12, weight="bold")
        c.text(8, y_mid + 14, src[2] if src else "not\navailable", size=7.5, va="top")
        if src is None:
            layout["rows"][role] = {"source": "not available"}
            for ci, v in enumerate(VIEWS):
                x0, y0, x1, y1 = panel_box(ri, ci)
                c.text((x0 + x1) / 2, (y0 + y1) / 2, "not available", size=9, ha="center")
                layout["panels"].append({"row": role, "view": v.name, "box_px": [x0, y0, x1, y1], "drawn": False})
            continue
        data, aff, what, brain_same_grid = src
        win = volume_window(data, brain_same_grid)
        windows[role] = win
        layout["rows"][role] = {"source": what.replace("\n", " "), "window": [round(win[0], 3), round(win[1], 3)]}
        slices[role] = {}
        for ci, v in enumerate(VIEWS):
            x0, y0, x1, y1 = panel_box(ri, ci)
            img = _sample(data, aff, worlds[v.name], order=1)
            slices[role][v.name] = img
            rgb = _grey(img, win)
            masks = grid_masks[v.name]
            if "brain" in masks:
                _paint(rgb, _outline(masks["brain"], 1), BRAIN_RGB)
            if "box" in masks:
                _paint(rgb, _outline(masks["box"], 1), BOX_RGB)
            if "oedema" in masks:
                _paint(rgb, _outline(masks["oedema"], 1), OEDEMA_RGB)
            if "lesion" in masks:
                _paint(rgb, _outline(masks["lesion"], 2), LESION_RGB)
            c.paste(x0, y0, rgb)
            labels = _labels(c, v, x0, y0)
            layout["panels"].append({"row": role, "view": v.name, "box_px": [x0, y0, x1, y1], "drawn": True,
                                     "world_to_px": _world_to_px(frame, v, x0, y0), "labels": labels})
        sx = panel_box(ri, 2)[2] + 10
        c.text(sx, y_mid - 14, f"window {win[0]:.4g} - {win[1]:.4g}", size=8)
        c.text(sx, y_mid + 8, "0.5th percentile of the volume to\n99.5th of the brain", size=7)
    # registration check: T1 and T2 edges over the T1ce
    ri = len(roles)
    y_mid = panel_box(ri, 0)[1] + PANEL_PX / 2
    c.text(8, y_mid - 10, "T1ce +", size=11, weight="bold")
    c.text(8, y_mid + 8, "T1 / T2 edges", size=8)
    base = "T1ce" if "T1ce" in slices else next(iter(slices))
    reg_rows = {"base": base, "edges": [r for r in ("T1", "T2") if r in slices]}
    layout["rows"]["registration"] = reg_rows
    counts = {}
    for ci, v in enumerate(VIEWS):
        x0, y0, x1, y1 = panel_box(ri, ci)
        rgb = _grey(slices[base][v.name], windows[base])
        e1 = edge_map(slices["T1"][v.name], windows["T1"]) if "T1" in slices else np.zeros(rgb.shape[:2], bool)
        e2 = edge_map(slices["T2"][v.name], windows["T2"]) if "T2" in slices else np.zeros(rgb.shape[:2], bool)
        _paint(rgb, e1 & ~e2, T1_EDGE_RGB)
        _paint(rgb, e2 & ~e1, T2_EDGE_RGB)
        _paint(rgb, e1 & e2, BOTH_EDGES_RGB)
        counts[v.name] = {"t1_only": int(np.count_nonzero(e1 & ~e2)), "t2_only": int(np.count_nonzero(e2 & ~e1)),
                          "both": int(np.count_nonzero(e1 & e2))}
        c.paste(x0, y0, rgb)
        labels = _labels(c, v, x0, y0)
        layout["panels"].append({"row": "registration", "view": v.name, "box_px": [x0, y0, x1, y1], "drawn": True,
                                 "world_to_px": _world_to_px(frame, v, x0, y0), "labels": labels})
    reg_rows["edge_pixels"] = counts
    sx = panel_box(ri, 2)[2] + 10
    y0 = panel_box(ri, 0)[1]
    c.text(sx, y0 + 14, "rigid offsets (registration):", size=8, weight="bold")
    c.text(sx, y0 + 46, _fmt_reg("T1", snap.registration.get("T1")), size=8)
    c.text(sx, y0 + 92, _fmt_reg("T2", snap.registration.get("T2")), size=8)
    c.text(sx, y0 + 130, "T1 edges", colour=T1_EDGE_RGB, size=8, weight="bold")
    c.text(sx, y0 + 146, "T2 edges", colour=T2_EDGE_RGB, size=8, weight="bold")
    c.text(sx, y0 + 162, "both (aligned)", colour=BOTH_EDGES_RGB, size=8, weight="bold")
    c.text(sx, y0 + 182, "parallel cyan / magenta lines =\nmisregistration", size=7)
    # footer legend
    fy = h - FOOTER_PX / 2
    x = 10
    for text, col in (("lesion", LESION_RGB), ("oedema", OEDEMA_RGB), ("brain mask", BRAIN_RGB),
                      ("model box", BOX_RGB)):
        c.text(x, fy, text, colour=col, size=8, weight="bold")
        x += 14 + 7 * len(text)
    c.text(x + 6, fy, "radiological convention: patient's right on the viewer's left (axial, coronal); "
           "sagittal: anterior on the left. RESEARCH USE ONLY", size=7.5)
    rgb = c.render()
    atomic_write_bytes(Path(path), _png_bytes(rgb, layout))
    thumb_path = None
    if thumb is not None:
        x0, y0, x1, y1 = panel_box(2 if sources["T1ce"] else (0 if sources["T1"] else 1), 0)
        atomic_write_bytes(Path(thumb), _png_bytes(np.ascontiguousarray(rgb[y0:y1, x0:x1]), None))
        thumb_path = Path(thumb)
    return QcPicture(Path(path), thumb_path, json.loads(json.dumps(layout, sort_keys=True, default=float)))


def stamp_result(path: Path, line: str) -> None:
    """Replace the second header line of a study picture (the result band) with ``line``
    (probability, spread and label, or the failure), in place and atomically; the layout's
    ``header`` is updated too.

    Raises
    ------
    ValueError
        ``path`` is not a recnec QC picture.
    """
    layout = read_layout(path)
    rgb = np.array(read_rgb(path))
    y0, y1 = RESULT_BAND_PX
    rgb[y0:y1] = BACKGROUND_RGB
    h, w = rgb.shape[:2]
    c = _Canvas(w, h)
    c.rgb = rgb
    c.text(10, 16 + 21, line, size=9.5, fit_px=w - 20)
    layout["header"] = (list(layout.get("header", []))[:1] or [""]) + [line]
    atomic_write_bytes(Path(path), _png_bytes(c.render(), layout))


# ---------------------------------------------------------------------------------------------
# the explanation picture
# ---------------------------------------------------------------------------------------------
def render_explanation(t1ce_box: np.ndarray, delta: np.ndarray, box_affine: np.ndarray, path: Path, *,
                       header: Sequence[str], name: str, notes: Sequence[str] = ()) -> QcPicture:
    """Draw the explanation map ``delta`` over the model-input T1ce channel and write it to ``path``.

    Parameters
    ----------
    t1ce_box:
        float32 ``(X, Y, Z)``: the T1ce channel of the model input (robust z-scores, RAS+).
    delta:
        float32 ``(X, Y, Z)``, same grid: the change of p(recurrence) when that region is hidden
        (:func:`recnec_cli.qc.explain.occlusion_sensitivity`); positive (red) = the region speaks
        for recurrence, negative (blue) = for necrosis. The colour scale runs to
        ``max(max |delta|, MIN_EXPLAIN_SCALE)`` (changes of p far below 0.02 stay faint instead of
        being blown up to full colour); shown where ``|delta|`` >= 15 % of the scale, opacity
        growing with ``|delta|``.
    box_affine:
        ``(4, 4)`` voxel -> RAS mm affine of the model box.
    header, name, notes:
        Text lines at the top, the study's QC name, and lines printed beside the map (method, cost).

    Row 1: the T1ce channel alone; row 2: with the map. Planes through the box centre (the lesion
    centroid).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    cmap = matplotlib.colormaps["RdBu_r"]
    shape = np.shape(t1ce_box)
    centre = (np.asarray(box_affine)[:3, :3] @ ((np.asarray(shape) - 1) / 2.0) + np.asarray(box_affine)[:3, 3])
    frame = _frame(shape, box_affine, centre)
    w = ROW_LABEL_PX + 3 * (PANEL_PX + GAP_PX) + SIDE_PX
    h = HEADER_PX + 2 * (PANEL_PX + GAP_PX) + FOOTER_PX
    c = _Canvas(w, h)
    for i, line in enumerate(list(header)[:2]):
        c.text(10, 16 + 21 * i, line, size=9.5, weight="bold" if i == 0 else "normal", fit_px=w - 20)
    nz = t1ce_box[t1ce_box != 0]
    win = (float(np.percentile(nz, 1)), float(np.percentile(nz, 99.5))) if nz.size else (-1.0, 1.0)
    if not win[1] > win[0]:
        win = (win[0], win[0] + 1.0)
    vmax = float(np.max(np.abs(delta))) if np.size(delta) else 0.0
    scale = max(vmax, MIN_EXPLAIN_SCALE)
    layout: dict[str, Any] = {"format": LAYOUT_FORMAT, "kind": "explanation", "name": name, "size_px": [w, h],
                              "slice_ras_mm": [round(float(v), 3) for v in centre], "max_abs_delta": vmax,
                              "colour_scale": scale,
                              "header": list(header)[:2], "panels": [], "notes": list(notes)}
    for ri, overlay in enumerate((False, True)):
        y_mid = panel_box(ri, 0)[1] + PANEL_PX / 2
        c.text(8, y_mid - 8, "T1ce", size=12, weight="bold")
        c.text(8, y_mid + 12, "model input" if not overlay else "+ occlusion\nsensitivity", size=7)
        for ci, v in enumerate(VIEWS):
            x0, y0, x1, y1 = panel_box(ri, ci)
            world = _panel_world(frame, v)
            rgb = _grey(_sample(t1ce_box, box_affine, world, order=1), win)
            if overlay and vmax > 0:
                d = _sample(delta, box_affine, world, order=1, outside=0.0) / scale
                a = np.where(np.abs(d) >= 0.15, 0.7 * np.clip(np.abs(d), 0, 1), 0.0)[..., None]
                col = cmap((np.clip(d, -1, 1) + 1) / 2)[..., :3] * 255.0
                rgb = ((1 - a) * rgb + a * col + 0.5).astype(np.uint8)
            c.paste(x0, y0, rgb)
            labels = _labels(c, v, x0, y0)
            layout["panels"].append({"row": "overlay" if overlay else "t1ce", "view": v.name,
                                     "box_px": [x0, y0, x1, y1], "drawn": True,
                                     "world_to_px": _world_to_px(frame, v, x0, y0), "labels": labels})
    # colour bar beside row 2
    bx, by = panel_box(1, 2)[2] + 14, panel_box(1, 0)[1] + 20
    ramp = np.linspace(1, -1, 160)
    bar = (cmap((ramp + 1) / 2)[:, :3] * 255).astype(np.uint8)
    c.paste(bx, by, np.repeat(bar[:, None, :], 14, axis=1))
    c.text(bx + 20, by + 4, f"+{scale:.3g}: hiding it lowers p\n(speaks for recurrence)", size=7)
    c.text(bx + 20, by + 80, "0", size=7)
    c.text(bx + 20, by + 154, f"-{scale:.3g}: hiding it raises p\n(speaks for necrosis)", size=7)
    sx, sy = panel_box(0, 2)[2] + 10, panel_box(0, 0)[1] + 10
    lines = [part for note in notes for part in textwrap.wrap(note, 44) or [""]]
    if vmax < 0.005:
        lines += [""] + textwrap.wrap(f"no region changes p(recurrence) by more than {vmax:.1g}: the "
                                      "output does not hinge on one place", 44)
    c.text(sx, sy, "\n".join(lines), size=7.5, va="top")
    c.text(10, h - FOOTER_PX / 2, "change of the ensemble's p(recurrence) when a cube of the model input is hidden "
           "(Zeiler & Fergus 2014). Radiological convention. RESEARCH USE ONLY", size=7.5)
    rgb = c.render()
    atomic_write_bytes(Path(path), _png_bytes(rgb, layout))
    return QcPicture(Path(path), None, json.loads(json.dumps(layout, sort_keys=True, default=float)))
