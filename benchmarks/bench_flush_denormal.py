"""HD-BET with and without flushing subnormal floats: seconds and mask agreement, same run.

For each volume, HD-BET (fast, no TTA, one thread) runs twice in fresh child processes, once with
``torch.set_flush_denormal(False)`` (torch's default) and once with it on (what recnec does in
every torch path, :func:`recnec_cli.devices.prepare_torch`). Prints CPU seconds of each, their
ratio, and the Dice of the two masks.

Volumes: the real TCGA-FG-6692 T1ce from ``$RECNEC_SHARED_DATA`` (default ``../shared/data``)
when present, and a synthetic head (``recnec synth``'s generator). The unflushed run of a real head
can take many minutes on processors that handle subnormals in microcode (1,956 s measured here for
a whole TCGA scan), so ``--crop N`` (default 96) cuts a centred N^3-voxel box of the canonical
volume first; ``--crop 0`` runs whole volumes.

    python benchmarks/bench_flush_denormal.py [--crop 96]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _cases import tcga_t1ce  # noqa: E402

CHILD = r"""
import json, sys, time, resource
import numpy as np, torch
torch.set_num_threads(1)
flush = sys.argv[2] == "1"
torch.set_flush_denormal(flush)
from recnec_cli.stages import skullstrip
import recnec_cli.devices as dev
dev.prepare_torch = lambda threads=0: None   # keep the mode chosen above
skullstrip.prepare_torch = dev.prepare_torch
from recnec_cli.stages.convert import read_image_file
vol = read_image_file(sys.argv[1])
hd = skullstrip.HdBet(mode="fast", device="cpu", tta=False, backend="torch")
t0 = resource.getrusage(resource.RUSAGE_SELF).ru_utime
w0 = time.perf_counter()
mask = hd.brain_mask(vol)
cpu = resource.getrusage(resource.RUSAGE_SELF).ru_utime - t0
np.save(sys.argv[3], mask)
print(json.dumps({"cpu_s": cpu, "wall_s": time.perf_counter() - w0, "voxels": int(mask.sum())}))
"""


def _crop(src: Path, n: int, dst: Path) -> Path:
    import nibabel as nib
    import numpy as np

    img = nib.as_closest_canonical(nib.load(str(src)))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if n <= 0:
        nib.save(nib.Nifti1Image(data, img.affine), str(dst))
        return dst
    c = np.array(data.shape) // 2
    lo = np.maximum(c - n // 2, 0)
    sl = tuple(slice(int(a), int(a) + n) for a in lo)
    aff = img.affine.copy()
    aff[:3, 3] = img.affine[:3, :3] @ lo + img.affine[:3, 3]
    nib.save(nib.Nifti1Image(data[sl], aff), str(dst))
    return dst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--crop", type=int, default=96)
    args = ap.parse_args()
    import numpy as np

    cases: list[tuple[str, Path]] = []
    ce = tcga_t1ce()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if ce:
            cases.append(("TCGA-FG-6692 T1ce", _crop(ce, args.crop, tmp / "tcga.nii.gz")))
        from recnec_cli.synth import write_cohort

        write_cohort(tmp / "syn", n=1, seed=21, fmt="nifti")
        syn = sorted((tmp / "syn").rglob("*ce-gadolinium*T1w.nii.gz"))[0]
        cases.append(("synthetic head T1ce", _crop(syn, args.crop, tmp / "syn.nii.gz")))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        print(f"{'volume':<22} {'default CPU s':>14} {'flushed CPU s':>14} {'ratio':>7} {'Dice':>7}")
        for name, path in cases:
            res = {}
            for flush in ("0", "1"):
                out = tmp / f"mask{flush}.npy"
                p = subprocess.run([sys.executable, "-c", CHILD, str(path), flush, str(out)], env=env,
                                   capture_output=True, text=True, check=True)
                res[flush] = json.loads(p.stdout.strip().splitlines()[-1])
                res[flush]["mask"] = np.load(out)
            a, b = res["0"]["mask"], res["1"]["mask"]
            dice = 2 * (a & b).sum() / max(1, a.sum() + b.sum())
            print(f"{name:<22} {res['0']['cpu_s']:>14.1f} {res['1']['cpu_s']:>14.1f} "
                  f"{res['0']['cpu_s'] / max(res['1']['cpu_s'], 1e-9):>7.1f} {dice:>7.4f}", flush=True)


if __name__ == "__main__":
    main()
