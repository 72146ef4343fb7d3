"""bench.embed_head_share on a tiny latent: the JSON it writes and the efficiency ceiling it derives."""

import json

from bench.embed_head_share import main


def test_embed_head_share_writes_its_json(tmp_path):
    out = tmp_path / "e.json"
    assert main(["--latent", "16", "1", "4", "4", "--built-layers", "1", "--reps", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["config"]["num_layers"] == 30 and data["config"]["ffn_dim"] == 8960 and data["image_tokens"] == 4
    share = data["embed_head_share_of_forward"]
    assert 0 < share < 1
    ratio = data["embed_head_over_stack"]
    for band, eff in data["efficiency_ceiling_at_speedup"].items():
        f = 1 / float(band[:-1])
        assert abs(eff - round((ratio + 1) / (ratio + f) * f, 4)) <= 2e-4
