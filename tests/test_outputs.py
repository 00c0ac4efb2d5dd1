"""What a run writes: complete exports (every token of a `--position all` run) and files others can read."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokentrail import cli

PROMPTS = "# math\n2 + 2 =\n7 * 6 = 42, and 6 * 7 =\n# story\nOnce upon a time\nThe sun set over the hills\n"


def test_position_all_exports_every_token(tmp_path, tiny_model_dir, capsys):
    """Every token's state at every layer, ragged (flat rows plus per-prompt offsets), checked against the model's
    own output_hidden_states run on each prompt alone, and loadable without pickle."""
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    assert cli.main(["trace", str(tmp_path / "prompts.txt"), "--model", str(tiny_model_dir), "--out",
                     str(tmp_path / "run"), "--position", "all", "-q"]) == 0
    assert cli.main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "all.npz")]) == 0
    capsys.readouterr()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    captured: dict[str, torch.Tensor] = {}

    def keep_output(module, args, output) -> None:
        captured["last"] = output[0] if isinstance(output, tuple) else output

    texts = ["2 + 2 =", "7 * 6 = 42, and 6 * 7 =", "Once upon a time", "The sun set over the hills"]
    with np.load(tmp_path / "all.npz", allow_pickle=False) as data:
        offsets, flat = data["token_offsets"], data["token_states"]
        assert data["prompts"].tolist() == texts
        assert offsets[0] == 0 and offsets[-1] == len(flat) == len(data["token_ids"]) == len(data["tokens"])
        n_layers = model.config.num_hidden_layers
        assert flat.shape[1:] == (n_layers + 1, model.config.hidden_size) and flat.dtype == np.float32
        for i, text in enumerate(texts):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            rows = slice(offsets[i], offsets[i + 1])
            assert data["token_ids"][rows].tolist() == ids
            assert data["tokens"][rows].tolist() == [tokenizer.decode([t]) for t in ids]  # each token as text
            captured.clear()
            hook = model.model.layers[-1].register_forward_hook(keep_output)
            with torch.no_grad():
                hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
            hook.remove()
            # Layers 0..L-1 are the inputs of the blocks; layer L is the last block's raw output.
            expected = torch.stack([*hidden[:n_layers], captured["last"]], dim=2)[0].numpy()
            np.testing.assert_allclose(flat[rows], expected, rtol=1e-4, atol=1e-5)
            # The last-token array is the last row of each prompt's tokens.
            np.testing.assert_array_equal(data["states"][i], flat[offsets[i + 1] - 1])


def test_last_position_export_has_no_token_states(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    assert cli.main(["trace", str(tmp_path / "prompts.txt"), "--model", str(tiny_model_dir), "--out",
                     str(tmp_path / "run"), "-q"]) == 0
    assert cli.main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "last.npz")]) == 0
    with np.load(tmp_path / "last.npz", allow_pickle=False) as data:
        assert "token_states" not in data and len(data["token_offsets"]) == 5
        assert data["states"].shape[0] == 4


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_output_has_the_permissions_the_umask_gives(tmp_path, tiny_model_dir, capsys, umask):
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    previous = os.umask(umask)
    try:
        assert cli.main(["run", str(tmp_path / "prompts.txt"), "--model", str(tiny_model_dir), "--out",
                         str(tmp_path / "run"), "-q", "--permutations", "9"]) == 0
        assert cli.main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "run" / "states.npz")]) == 0
        assert cli.main(["project", str(tmp_path / "run")]) == 0
    finally:
        os.umask(previous)
    capsys.readouterr()
    files = [p for p in Path(tmp_path / "run").rglob("*") if p.is_file()]
    assert len(files) > 20 and any(p.suffix == ".gif" for p in files) and any(p.suffix == ".safetensors" for p in files)
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
