"""The sampling job in one process (no pool): carried inputs rebuild to the stock result; the rest is refused.

build_job runs on a shell MODEL (meta weights, as XDiTUNetLoader returns it); run_job runs on a stock-loaded
model, so any difference comes from carrying the inputs, not from parallelism.
"""
from __future__ import annotations

import pytest
import torch

import flux_cases
from comfyui_xdit.errors import UnsupportedByXDiT

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def models(comfy_root, tiny_flux_paths):
    import comfy.sd

    from comfyui_xdit.job_spec import PoolModelRef
    from comfyui_xdit.shell_model import build_shell

    path = str(tiny_flux_paths["dev"])
    ref = PoolModelRef(path, "default", (("ulysses_degree", 1),), 1, "", 2)
    return {"shell": build_shell(path, "default", ref), "stock": comfy.sd.load_diffusion_model(path)}


def _inputs(model, guider="cfg", sampler=None, steps=3):
    from comfy_extras import nodes_custom_sampler as custom
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux

    model = ModelSamplingFlux().patch(model, 1.15, 0.5, 128, 128)[0]
    if guider == "cfg":
        g = flux_cases._first(custom.CFGGuider.execute(model, flux_cases._conditioning(100), flux_cases._conditioning(200), 3.5))
    else:
        g = flux_cases._first(custom.BasicGuider.execute(model, flux_cases._conditioning(100)))
    sigmas = flux_cases._first(custom.BasicScheduler.execute(model, "simple", steps, 1.0))
    sampler = sampler or flux_cases._first(custom.KSamplerSelect.execute("euler"))
    noise = flux_cases._first(custom.RandomNoise.execute(7))
    return g, sampler, sigmas, noise, {"samples": torch.zeros(1, 16, 16, 16)}


def _samplers():
    from comfy_extras import nodes_custom_sampler as custom

    return {
        "dpmpp_2m": lambda: flux_cases._first(custom.KSamplerSelect.execute("dpmpp_2m")),
        "dpm_fast (closure)": lambda: flux_cases._first(custom.KSamplerSelect.execute("dpm_fast")),
        "ddim (inpaint options)": lambda: flux_cases._first(custom.KSamplerSelect.execute("ddim")),
        "euler_ancestral eta 0.7 (extra options, seeded noise)": lambda: flux_cases._first(custom.SamplerEulerAncestral.execute(0.7, 1.0)),
    }


@pytest.mark.parametrize("sampler_name", ["dpmpp_2m", "dpm_fast (closure)", "ddim (inpaint options)", "euler_ancestral eta 0.7 (extra options, seeded noise)"])
def test_carried_job_reproduces_stock_sampling_bit_for_bit(models, sampler_name):
    from comfy_extras import nodes_custom_sampler as custom

    from comfyui_xdit.job import build_job, run_job

    sampler = _samplers()[sampler_name]()
    g, smp, sigmas, noise, latent = _inputs(models["stock"], sampler=sampler)
    stock = custom.SamplerCustomAdvanced.execute(noise, g, smp, sigmas, latent).result[0]["samples"]
    g2, smp2, sigmas2, noise2, latent2 = _inputs(models["shell"], sampler=_samplers()[sampler_name]())
    job = build_job(g2, smp2, sigmas2, noise2.generate_noise(latent2), latent2["samples"], None, noise2.seed)
    carried = run_job(models["stock"], job, lambda *args: None)
    assert torch.equal(carried, stock)


def test_the_shell_model_refuses_stock_sampling(models):
    from comfy_extras import nodes_custom_sampler as custom

    g, smp, sigmas, noise, latent = _inputs(models["shell"])
    with pytest.raises(UnsupportedByXDiT, match="sample it with XDiTSamplerCustomAdvanced"):
        custom.SamplerCustomAdvanced.execute(noise, g, smp, sigmas, latent)


def test_shell_holds_no_weights(models):
    params = list(models["shell"].model.diffusion_model.parameters())
    assert params and all(p.device.type == "meta" for p in params)


def _job_of(guider, sampler, sigmas, noise, latent):
    from comfyui_xdit.job import build_job

    return build_job(guider, sampler, sigmas, noise.generate_noise(latent), latent["samples"], None, noise.seed)


def test_refuses_a_model_from_the_stock_loader(models):
    with pytest.raises(UnsupportedByXDiT, match="needs a MODEL from XDiTUNetLoader"):
        _job_of(*_inputs(models["stock"]))


def test_refuses_weight_patches_with_a_pointer_to_the_xdit_lora_loader(models):
    patched = models["shell"].clone()
    key = next(iter(patched.model.diffusion_model.state_dict()))
    patched.add_patches({f"diffusion_model.{key}": (torch.zeros(1),)}, 1.0)
    with pytest.raises(UnsupportedByXDiT, match="weight patches .* use XDiTLoraLoader"):
        _job_of(*_inputs(patched))


def test_refuses_sampler_patches_from_other_nodes(models):
    patched = models["shell"].clone()
    patched.set_model_sampler_cfg_function(lambda args: args["cond"])
    with pytest.raises(UnsupportedByXDiT, match=r"sampler patches \['sampler_cfg_function'\]"):
        _job_of(*_inputs(patched))


def test_refuses_foreign_wrappers_and_object_patches(models):
    import comfy.patcher_extension

    wrapped = models["shell"].clone()
    wrapped.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "other_pack", lambda executor, *a, **k: executor(*a, **k))
    with pytest.raises(UnsupportedByXDiT, match=r"apply_model wrappers \['other_pack'\]"):
        _job_of(*_inputs(wrapped))
    patched = models["shell"].clone()
    patched.add_object_patch("diffusion_model.final_layer", torch.nn.Identity())
    with pytest.raises(UnsupportedByXDiT, match="object patches .*diffusion_model.final_layer"):
        _job_of(*_inputs(patched))


def test_refuses_controlnet_in_conditioning(models):
    g, smp, sigmas, noise, latent = _inputs(models["shell"])
    g.original_conds["positive"][0]["control"] = object()
    with pytest.raises(UnsupportedByXDiT, match=r"positive conditioning carries ControlNet \('control'\)"):
        _job_of(g, smp, sigmas, noise, latent)


def test_a_clip_vision_output_travels_as_plain_data(models):
    import pickle

    import comfy.clip_vision

    from comfyui_xdit.job import _is_plain, rebuild_conds

    g, smp, sigmas, noise, latent = _inputs(models["shell"])
    output = comfy.clip_vision.Output()
    output["penultimate_hidden_states"] = torch.randn(1, 257, 1280, generator=torch.Generator().manual_seed(0))
    g.original_conds["positive"][0]["clip_vision_output"] = output  # as WanImageToVideo sets it
    job = _job_of(g, smp, sigmas, noise, latent)
    assert _is_plain(job.conds)
    rebuilt = rebuild_conds(pickle.loads(pickle.dumps(job.conds)))["positive"][0][1]["clip_vision_output"]
    assert type(rebuilt) is comfy.clip_vision.Output and vars(rebuilt).keys() == {"penultimate_hidden_states"}
    assert torch.equal(rebuilt.penultimate_hidden_states, output.penultimate_hidden_states)


def test_refuses_other_guiders_and_custom_samplers(models):
    import comfy.samplers
    from comfy_extras import nodes_custom_sampler as custom

    g, smp, sigmas, noise, latent = _inputs(models["shell"])
    dual = flux_cases._first(custom.DualCFGGuider.execute(g.model_patcher, flux_cases._conditioning(1), flux_cases._conditioning(2), flux_cases._conditioning(3), 3.0, 2.0, "regular"))
    with pytest.raises(UnsupportedByXDiT, match="guider Guider_DualCFG is not supported"):
        _job_of(dual, smp, sigmas, noise, latent)

    def my_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None):
        return x

    with pytest.raises(UnsupportedByXDiT, match="sampler function my_sampler is not one of ComfyUI's samplers"):
        _job_of(g, comfy.samplers.KSAMPLER(my_sampler), sigmas, noise, latent)


def test_model_level_refusals_name_the_fix(models):
    from comfyui_xdit.families import adapter_for
    from comfyui_xdit.parallel_model import validate_for_model
    from parallel_core import ParallelConfig

    with pytest.raises(ValueError, match="pipefusion_degree 3 is more stages than the model's 2 transformer blocks; use at most 2"):
        validate_for_model(ParallelConfig(pipefusion_degree=3), 3, models["shell"])
    validate_for_model(ParallelConfig(pipefusion_degree=2), 2, models["shell"])  # one block per stage is fine
    with pytest.raises(ValueError, match="patch_degree 2 .*cannot be combined with ring_degree 2"):
        validate_for_model(ParallelConfig(patch_degree=2, ring_degree=2), 4, models["shell"])
    with pytest.raises(ValueError, match="= 2, but 4 ranks are running"):
        validate_for_model(ParallelConfig(ulysses_degree=2), 4, models["shell"])
    with pytest.raises(UnsupportedByXDiT, match="Linear is not a ComfyUI diffusion model .* load it with UNETLoader"):
        adapter_for(torch.nn.Linear(1, 1))


def _cached(model, node_name: str, threshold: float = 0.1):
    from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode

    node = {"EasyCache": EasyCacheNode, "LazyCache": LazyCacheNode}[node_name]
    return node.execute(model, threshold, 0.15, 0.95, False).result[0]


@pytest.mark.parametrize("node_name", ["EasyCache", "LazyCache"])
def test_stock_caches_travel_as_plain_data_and_skip_as_stock_does(models, node_name):
    import pickle

    from comfy_extras import nodes_custom_sampler as custom

    from comfyui_xdit.job import _is_plain, run_job

    # One plain step first: stock caches read the patched model_sampling only once the model is loaded with it (see
    # cache_cases.cache_rank), as the workers always do.
    g, smp, sigmas, noise, latent = _inputs(models["stock"], steps=1)
    custom.SamplerCustomAdvanced.execute(noise, g, smp, sigmas, latent)
    calls = []
    hook = models["stock"].model.diffusion_model.final_layer.register_forward_hook(lambda *args: calls.append(1))
    try:
        g, smp, sigmas, noise, latent = _inputs(_cached(models["stock"], node_name), steps=10)
        stock = custom.SamplerCustomAdvanced.execute(noise, g, smp, sigmas, latent).result[0]["samples"]
        stock_calls = len(calls)
        job = _job_of(*_inputs(_cached(models["shell"], node_name), steps=10))
        assert _is_plain(job.stock_patches) and pickle.loads(pickle.dumps(job.stock_patches)) == job.stock_patches
        assert job.stock_patches["holder"]["class"] == f"{node_name}Holder"
        assert job.stock_patches["holder"]["parameters"]["reuse_threshold"] == 0.1
        carried = run_job(models["stock"], job, lambda *args: None)
    finally:
        hook.remove()
    assert 0 < stock_calls < 10, f"stock {node_name} ran the model {stock_calls} times in 10 steps; the case proves nothing"
    assert len(calls) == 2 * stock_calls and torch.equal(carried, stock)


def test_torch_compile_travels_as_its_options(models):
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    job = _job_of(*_inputs(TorchCompileModel.execute(models["shell"], "inductor").result[0]))
    assert job.stock_patches["compile"] == {"keys": ["diffusion_model"], "options": {}, "backend": "inductor",
                                            "mode": None, "fullgraph": False, "dynamic": None}
    assert job.model_option_flags == {}


def test_refuses_caches_and_compile_with_stale_activation_degrees(tiny_flux_paths):
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    from comfyui_xdit.job_spec import PoolModelRef
    from comfyui_xdit.shell_model import build_shell

    path = str(tiny_flux_paths["dev"])
    shell = build_shell(path, "default", PoolModelRef(path, "default", (("pipefusion_degree", 2),), 2, "", 2))
    with pytest.raises(UnsupportedByXDiT, match="EasyCache cannot run with pipefusion_degree 2 .* set pipefusion_degree to 1 or remove EasyCache"):
        _job_of(*_inputs(_cached(shell, "EasyCache")))
    with pytest.raises(UnsupportedByXDiT, match="LazyCache and TorchCompileModel cannot run with pipefusion_degree 2"):
        _job_of(*_inputs(TorchCompileModel.execute(_cached(shell, "LazyCache"), "inductor").result[0]))


def test_refuses_compile_with_sharded_weights(tiny_flux_paths):
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    from comfyui_xdit.job_spec import PoolModelRef
    from comfyui_xdit.shell_model import build_shell

    path = str(tiny_flux_paths["dev"])
    shell = build_shell(path, "default", PoolModelRef(path, "default", (("ulysses_degree", 2),), 2, "", 2, weight_sharding="blocks"))
    _job_of(*_inputs(shell))
    with pytest.raises(UnsupportedByXDiT, match="TorchCompileModel is not supported with weight_sharding 'blocks' yet; remove TorchCompileModel or set XDiTUNetLoader's weight_sharding to none"):
        _job_of(*_inputs(TorchCompileModel.execute(shell, "inductor").result[0]))


def test_refuses_lookalike_caches_and_compile_options(models):
    import comfy.patcher_extension
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    class EasyCacheHolder:  # another pack's holder under the stock option name
        pass

    foreign_holder = _cached(models["shell"], "EasyCache")
    foreign_holder.model_options["transformer_options"]["easycache"] = EasyCacheHolder()
    with pytest.raises(UnsupportedByXDiT, match="'easycache' holds a EasyCacheHolder from another node pack"):
        _job_of(*_inputs(foreign_holder))

    def easycache_forward_wrapper(executor, *args, **kwargs):  # same name, not ComfyUI's code
        return executor(*args, **kwargs)

    mixed = _cached(models["shell"], "EasyCache")
    mixed.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "easycache", easycache_forward_wrapper)
    with pytest.raises(UnsupportedByXDiT, match=r"diffusion_model wrappers \['easycache'\] from another node pack"):
        _job_of(*_inputs(mixed))
    guarded = models["shell"].clone()
    set_torch_compile_wrapper(model=guarded, backend="inductor", options={"post_grad_custom_pre_pass": lambda graph: graph})
    with pytest.raises(UnsupportedByXDiT, match=r"TorchCompileModel: compile options \['post_grad_custom_pre_pass'\] are not plain data"):
        _job_of(*_inputs(guarded))


def test_cache_schedules_and_the_analysis_refuse_what_the_pool_cannot_run(models, tiny_flux_paths):
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    from comfyui_xdit.block_cache import SCHEDULE_ATTACHMENT
    from comfyui_xdit.job import build_job
    from comfyui_xdit.job_spec import PoolModelRef
    from comfyui_xdit.shell_model import build_shell

    def scheduled(model, steps=3):
        model = model.clone()
        model.set_attachments(SCHEDULE_ATTACHMENT, {"steps": steps, "reuse": {1: [0, 1]}})
        return model

    def analysis_of(guider, sampler, sigmas, noise, latent):
        return build_job(guider, sampler, sigmas, noise.generate_noise(latent), latent["samples"], None, noise.seed, analyse=True)

    assert _job_of(*_inputs(scheduled(models["shell"]))).block_cache == {"analyse": False, "reuse": {1: [0, 1]}}
    with pytest.raises(UnsupportedByXDiT, match="made for 5 steps and the sampler runs 3; set the scheduler's steps to 5"):
        _job_of(*_inputs(scheduled(models["shell"], steps=5)))
    with pytest.raises(UnsupportedByXDiT, match="XDiTCacheSchedule and EasyCache/LazyCache both cache this MODEL"):
        _job_of(*_inputs(_cached(scheduled(models["shell"]), "EasyCache")))
    with pytest.raises(UnsupportedByXDiT, match="does not run on a TorchCompileModel MODEL"):
        _job_of(*_inputs(TorchCompileModel.execute(scheduled(models["shell"]), "inductor").result[0]))
    path = str(tiny_flux_paths["dev"])
    for degrees, message in (((("pipefusion_degree", 2),), "XDiTRedundancyAnalysis cannot run with pipefusion_degree 2 .* set "
                              "pipefusion_degree to 1 on XDiTUNetLoader for the analysis"),
                             ((("patch_degree", 2),), "XDiTRedundancyAnalysis cannot run with patch_degree 2"),
                             ((("cfg_degree", 2),), None)):
        shell = build_shell(path, "default", PoolModelRef(path, "default", degrees, 2, "", 2))
        assert _job_of(*_inputs(scheduled(shell))).block_cache["reuse"]  # a schedule runs under all of them
        if message:
            with pytest.raises(UnsupportedByXDiT, match=message):
                analysis_of(*_inputs(shell))
        else:  # the analysis runs under cfg parallel
            assert analysis_of(*_inputs(shell)).block_cache == {"analyse": True}
