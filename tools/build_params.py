"""Build the twelve shipped params files from the published calibration curves.

Usage: python tools/build_params.py [--data ../shared/calibration-data] [--out ditcache/params]

Each output records where its numbers came from (repository, commit, file), the step count and
shift they were measured at where known, and a "proxy" flag with the reason when the curve was
measured on a neighbouring model. Run it again whenever the calibration data changes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ditcache.params.loader import params_from_dict, sanitize_model_name

TELEFUSER_REPO = "Tele-AI/TeleFuser"
TELEFUSER_COMMIT = "5a12f03efd1484c024726370c95bdb7cb5e84c70"
TELEFUSER_PATH = "telefuser/feature_cache/ada_taylor_cache/params/{name}"

# (model_type, default steps, source file, proxy reason or None, note)
MODELS: list[tuple[str, int, str, str | None, str]] = [
    ("Wan2.1-T2V-1.3B", 50, "telefuser_Wan2_1-T2V-1_3B.json", None, "equals MagCache's Wan2.1 T2V-1.3B curve"),
    ("Wan2.1-T2V-14B", 50, "telefuser_Wan2_1-T2V-14B.json", None, "equals MagCache's Wan2.1 T2V-14B curve"),
    ("Wan2.1-I2V-14B-480P", 50, "telefuser_Wan2_1-I2V-14B-480P.json", None, "equals MagCache's I2V-480P curve"),
    ("Wan2.1-I2V-14B-720P", 50, "telefuser_Wan2_1-I2V-14B-720P.json", None, "close to MagCache's 720P curve"),
    ("Wan2.1-FL2V-14B-720P", 50, "telefuser_Wan2_1-FL2V-14B-720P.json", None, "no MagCache counterpart"),
    ("Wan2.2-T2V-A14B", 50, "telefuser_Wan2_2-T2V-A14B.json", None, "one curve spans both experts"),
    ("Wan2.2-I2V-A14B", 40, "telefuser_Wan2_2-I2V-A14B.json", None, "one curve spans both experts"),
    ("Wan2.2-FL2V-A14B", 40, "telefuser_Wan2_2-FL2V-A14B.json", None, "one curve spans both experts"),
    ("HunyuanVideo-T2V", 50, "magcache_HunyuanVideo_T2V_720p.json", None,
     "embedded guidance: one forward per step, so one curve; it serves the cond branch, and the "
     "uncond branch when a caller runs real CFG"),
    ("HunyuanVideo-I2V", 50, "telefuser_HunyuanVideo15-I2V-480P.json",
     "measured on HunyuanVideo 1.5 I2V 480P, not on HunyuanVideo-I2V; recalibrate for best quality", ""),
    ("Qwen-Image", 50, "magcache_Qwen_Image.json", None, ""),
    ("Qwen-Image-Edit-Plus", 40, "magcache_Qwen_Image_Edit.json",
     "measured on Qwen-Image-Edit at 50 steps, not on Qwen-Image-Edit-Plus (default 40 steps); "
     "recalibrate for best quality", ""),
]


# Two-expert models: Wan2.2's published inference configs (wan/configs/wan_t2v_A14B.py and
# wan_i2v_A14B.py: boundary, sample_shift). FL2V runs the I2V-A14B experts.
WAN22_EXPERTS = {
    "Wan2.2-T2V-A14B": (0.875, 12.0, "wan/configs/wan_t2v_A14B.py"),
    "Wan2.2-I2V-A14B": (0.900, 5.0, "wan/configs/wan_i2v_A14B.py"),
    "Wan2.2-FL2V-A14B": (0.900, 5.0, "wan/configs/wan_i2v_A14B.py (FL2V runs the I2V-A14B experts)"),
}


def build_one(model_type: str, default_steps: int, src: Path, proxy: str | None, note: str) -> dict:
    raw = json.loads(src.read_text())
    provenance: dict = {"source_file": src.name, "proxy": proxy is not None}
    if proxy:
        provenance["proxy_reason"] = proxy
    if src.name.startswith("telefuser_"):
        K, thresh, retention = raw["K"], raw["thresh"], raw["retention_ratio"]
        cond, uncond = raw["cond_mag_ratios"], raw["uncond_mag_ratios"]
        shift = raw.get("sigma_shift")
        provenance.update(
            source_repo=TELEFUSER_REPO,
            source_commit=TELEFUSER_COMMIT,
            source_path=TELEFUSER_PATH.format(name=src.name.removeprefix("telefuser_")),
        )
    else:
        rec = raw["recommended"]
        K, thresh, retention = rec["magcache_K"], rec["magcache_thresh"], rec["retention_ratio"]
        if "cond_mag_ratios" in raw:
            cond, uncond = raw["cond_mag_ratios"], raw["uncond_mag_ratios"]
        else:
            cond = uncond = raw["mag_ratios"]
            provenance["uncond_from"] = "cond curve (the source model runs one forward per step)"
        shift = raw.get("sigma_shift")
        provenance.update(
            source_repo=raw["source_repo"],
            source_commit=raw["source_commit"],
            source_path=f"{raw['source_path']}:{raw['source_line']}",
            settings_source=rec.get("source"),
        )
    if note:
        provenance["notes"] = note
    if shift is None:
        provenance["sigma_shift_note"] = "not recorded by the source"
    data = {
        "model_type": model_type,
        "K": K,
        "retention_ratio": retention,
        "thresh": thresh,
        "sigma_shift": shift,
        "num_inference_steps": len(cond),
        "default_steps": default_steps,
        "cond_mag_ratios": cond,
        "uncond_mag_ratios": uncond,
        "provenance": provenance,
    }
    if model_type in WAN22_EXPERTS:
        boundary, sample_shift, config = WAN22_EXPERTS[model_type]
        data.update(boundary_ratio=boundary, default_shift=sample_shift)
        provenance["experts_source"] = f"Wan-Video/Wan2.2 {config}: boundary, sample_shift"
    params_from_dict(data, source=f"{model_type} (from {src.name})")
    return data


def main() -> None:
    root = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=root.parent / "shared" / "calibration-data")
    parser.add_argument("--out", type=Path, default=root / "ditcache" / "params")
    args = parser.parse_args()
    for model_type, steps, src, proxy, note in MODELS:
        data = build_one(model_type, steps, args.data / src, proxy, note)
        path = args.out / f"{sanitize_model_name(model_type)}.json"
        path.write_text(json.dumps(data, indent=1) + "\n")
        print(f"{path.relative_to(root)}: {len(data['cond_mag_ratios'])} steps from {src}")


if __name__ == "__main__":
    main()
