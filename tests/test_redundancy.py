"""The analysis file, figure and schedule choice (comfyui_xdit/redundancy.py): pure logic on made-up analyses."""
from __future__ import annotations

import json

import pytest

from comfyui_xdit.errors import UnsupportedByXDiT

pytestmark = pytest.mark.fast

STEPS, BLOCKS = 6, 4
MODEL = {"file": "flux-dev.safetensors", "bytes": 1000, "header_sha256": "ab" * 32}


def _analysis(frozen: set[tuple[int, int]] = frozenset(), cheap: dict[tuple[int, int], float] | None = None) -> dict:
    """Changes of 0.1 * (1 + block) everywhere but `frozen` cells (0) and `cheap` ones (their value); step 0 has none."""
    def value(s, b):
        return 0.0 if (s, b) in frozen else (cheap or {}).get((s, b), 0.1 * (1 + b))

    table = [None] + [[value(s, b) for b in range(BLOCKS)] for s in range(1, STEPS)]
    prev = [[1.0] * BLOCKS for _ in range(STEPS)]
    return {"format": "comfyui-xdit.redundancy-analysis", "model": dict(MODEL), "steps": STEPS, "blocks": [f"blocks.{b}" for b in range(BLOCKS)],
            "output_change": table, "input_change": table, "residual_change": table, "reuse_error": table,
            "sums": {"output_diff": [[0.0] * BLOCKS] + [row for row in table[1:]], "output_prev": prev}}


def test_figure_shows_zero_change_where_blocks_were_frozen(comfy_root):
    from comfyui_xdit import redundancy

    frozen = {(2, 1), (3, 1), (3, 2)}
    analysis = _analysis(frozen)
    image = redundancy.render(analysis)
    assert image.dim() == 4 and image.shape[0] == 1 and image.shape[-1] == 3

    def pixel(step, block):
        x, y = redundancy.cell_centre(analysis, step, block)
        return tuple(round(float(v) * 255) for v in image[0, y, x])

    for step in range(STEPS):
        for block in range(BLOCKS):
            expected = (redundancy.NO_DATA if step == 0 else redundancy.colour(0.0) if (step, block) in frozen
                        else redundancy.colour((0.1 * (1 + block)) / (0.1 * BLOCKS)))
            assert pixel(step, block) == expected, (step, block)
    assert redundancy.colour(0.0) != redundancy.colour(0.25)


def test_schedule_picks_the_cheapest_evaluations_and_never_step_zero(comfy_root):
    from comfyui_xdit.redundancy import choose_schedule

    cheap = {(2, 3): 0.001, (4, 0): 0.002, (5, 2): 0.003}
    blocks = choose_schedule(_analysis(cheap=cheap), 0.75, "blocks")  # 3 of 4 blocks' worth
    assert blocks["reuse"] == {2: [3], 4: [0], 5: [2]} and blocks["skipped_evaluations"] == 3
    assert blocks["estimated_error"] == pytest.approx(0.006)
    # Whole steps: the step with the least summed error, and consecutive reuse costs the accumulated drift.
    steps = choose_schedule(_analysis(cheap={(3, b): 0.01 for b in range(BLOCKS)}), 1, "steps")
    assert steps["reuse"] == {3: [0, 1, 2, 3]} and steps["skipped_steps_equivalent"] == 1
    all_but_first = choose_schedule(_analysis(), 100, "steps")
    assert sorted(all_but_first["reuse"]) == list(range(1, STEPS))
    limited = choose_schedule(_analysis(cheap=cheap), 5, "blocks", max_error=0.0035)
    assert limited["reuse"] == {2: [3], 4: [0]}
    assert choose_schedule(_analysis(), 0, "blocks")["reuse"] == {}


def test_foreign_analysis_is_refused_naming_both_models(comfy_root):
    from comfyui_xdit.redundancy import refuse_foreign

    other = {"file": "qwen-image.safetensors", "bytes": 2000, "header_sha256": "cd" * 32}
    with pytest.raises(UnsupportedByXDiT, match=r"made for flux-dev\.safetensors.*loaded model qwen-image\.safetensors"):
        refuse_foreign(_analysis(), other)
    refuse_foreign(_analysis(), dict(MODEL))
    # The same name and size with other tensors is another model too.
    with pytest.raises(UnsupportedByXDiT, match="header cdcdcdcdcdcd"):
        refuse_foreign(_analysis(), {**MODEL, "header_sha256": "cd" * 32})


def test_analyses_are_saved_numbered_and_chosen_only_from_the_list(comfy_root, tmp_path, monkeypatch):
    import folder_paths

    from comfyui_xdit import redundancy

    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path / "output"))
    monkeypatch.setattr(folder_paths, "input_directory", str(tmp_path / "input"))
    (tmp_path / "input").mkdir()
    first, second = redundancy.save_analysis(_analysis()), redundancy.save_analysis(_analysis())
    assert (first, second) == ("output/xdit_analysis_flux-dev_00001.json", "output/xdit_analysis_flux-dev_00002.json")
    (tmp_path / "input" / "xdit_analysis_shared_00001.json").write_text(json.dumps(_analysis()))
    (tmp_path / "input" / "notes.json").write_text("{}")
    assert redundancy.analysis_files() == [first, second, "input/xdit_analysis_shared_00001.json"]
    assert redundancy.load_analysis(second)["model"] == MODEL
    (tmp_path / "secret.json").write_text(json.dumps(_analysis()))
    for path in ("output/../secret.json", str(tmp_path / "secret.json"), "input/notes.json"):
        with pytest.raises(UnsupportedByXDiT, match="no saved analysis"):
            redundancy.load_analysis(path)


def test_model_identity_tells_files_apart(comfy_root, tiny_flux_paths):
    from comfyui_xdit.redundancy import model_identity

    dev, schnell = model_identity(str(tiny_flux_paths["dev"])), model_identity(str(tiny_flux_paths["schnell"]))
    assert dev["file"] == "flux-dev.safetensors" and dev["bytes"] == tiny_flux_paths["dev"].stat().st_size
    assert dev["header_sha256"] != schnell["header_sha256"]


def test_a_schedule_is_made_only_from_its_models_analysis(comfy_root, tiny_flux_paths):
    from comfyui_xdit.block_cache import SCHEDULE_ATTACHMENT
    from comfyui_xdit.job_spec import PoolModelRef
    from comfyui_xdit.redundancy import model_identity, scheduled_model
    from comfyui_xdit.shell_model import build_shell

    def shell(variant):
        path = str(tiny_flux_paths[variant])
        return build_shell(path, "default", PoolModelRef(path, "default", (("ulysses_degree", 2),), 2, "", 2)), path

    dev, dev_path = shell("dev")
    analysis = {**_analysis(), "model": model_identity(dev_path), "blocks": ["double_blocks.0", "single_blocks.0"],
                "reuse_error": [None] + [[0.1, 0.2] for _ in range(STEPS - 1)]}
    model = scheduled_model(dev, dev_path, analysis, 1.0, "steps", 0.0)
    schedule = model.attachments[SCHEDULE_ATTACHMENT]
    assert schedule["steps"] == STEPS and schedule["skipped_evaluations"] == 2 and SCHEDULE_ATTACHMENT not in dev.attachments
    with pytest.raises(UnsupportedByXDiT, match="made for flux-dev.safetensors .* not for the loaded model flux-schnell.safetensors"):
        scheduled_model(*shell("schnell"), analysis, 1.0, "steps", 0.0)
    with pytest.raises(UnsupportedByXDiT, match="the analysis lists blocks"):
        scheduled_model(dev, dev_path, {**analysis, "blocks": ["transformer_blocks.0"]}, 1.0, "steps", 0.0)
