"""Validation beside the fields: each section checks itself under its full key; `Config` checks what spans sections."""

from pathlib import Path

import pytest

from vla_scale.config import Config, ConfigError, load_config, save_config, validate
from vla_scale.config.schema import (
    ActionHeadConfig,
    AugmentConfig,
    ClipRegConfig,
    DataConfig,
    LoraConfig,
    ModelConfig,
    SourceConfig,
    StageConfig,
    TinyClipConfig,
    TrainConfig,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("train.zero_stage=4", r"zero_stage"),
        ("train.global_batch_size=7", r"multiple of train\.micro_batch_size"),
        ("data.sources.0.weight=-1", r"data\.sources\.0\.weight must be >= 0"),
        ("data.window_size=0", r"data\.window_size must be >= 1"),
        ("model.backbone.pretrained=", r"model\.backbone\.pretrained is empty"),
        ("optim.lr=0", r"optim\.lr must be > 0, got 0\.0: .*0 trains nothing"),
        ("optim.lr=-0.001", r"optim\.lr must be > 0, got -0\.001: .*a negative one ascends the loss"),
        ("optim.betas=[0.9, 1.0]", r"optim\.betas must both be in \[0, 1\), got \[0\.9, 1\.0\]"),
        ("optim.eps=-1e-8", r"optim\.eps must be >= 0"),
        ("optim.weight_decay=-0.1", r"optim\.weight_decay must be >= 0"),
    ],
)
def test_impossible_values(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(ROOT / "configs/debug.yaml", [override])


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("model.resampler.num_latents=0", r"model\.resampler\.num_latents must be >= 1"),
        ("model.resampler.depth=0", r"model\.resampler\.depth must be >= 1"),
        ("model.resampler.heads=0", r"model\.resampler\.heads must be >= 1"),
        ("model.clip_reg.pretrained=", r"model\.clip_reg\.pretrained is empty"),
        ("model.clip_reg.embed_dim=0", r"model\.clip_reg\.embed_dim must be >= 1"),
        ("model.clip_reg.loss=l2", r"model\.clip_reg\.loss: 'l2' is not one of"),
        ("model.clip_reg.tiny.num_heads=3", r"model\.clip_reg\.tiny\.num_heads \(3\) must be >= 1 and divide"),
        ("model.loss_weights.clip=-1", r"model\.loss_weights\.clip must be >= 0"),
    ],
)
def test_bad_resampler_and_clip_settings_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(ROOT / "configs/debug_mechanisms.yaml", [override])


# --- history modelling (model.history_type x model.head.type x model.action_space) ---------------------------
@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["model.history_type=pre", "model.head.type=lstm"], r"head\.type=lstm .*needs model\.history_type: post"),
        (["model.history_type=video", "model.head.type=gpt"], r"history_type video .*use model\.head\.type: mlp"),
        (["model.action_space=discrete", "model.head.type=gpt"], r"needs model\.action_space: continuous"),
        (["model.head.type=gpt", "model.head.num_heads=3"], r"model\.head\.num_heads \(3\) must be >= 1 and divide"),
        (["model.head.type=lstm", "model.head.num_layers=0"], r"model\.head\.num_layers must be >= 1"),
        (["model.head.type=gpt", "model.head.max_history=4"], r"max_history \(4\) must equal data\.window_size \(1\)"),
        (["model.history_type=interleaved"], r"model\.history_type: 'interleaved' is not one of"),
    ],
)
def test_impossible_history_combinations_say_what_to_change(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(ROOT / "configs/debug.yaml", overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.history_type=pre", "data.window_size=3"],
        ["model.history_type=pre", "model.action_space=discrete", "data.window_size=2"],
        ["model.history_type=video", "model.action_space=discrete"],
        ["model.history_type=video"],  # window_size 1: one frame, one set of action tokens
        ["model.head.type=lstm", "data.window_size=3", "model.head.max_history=3"],
    ],
)
def test_history_combinations_that_work_load(overrides):
    load_config(ROOT / "configs/debug.yaml", overrides)


def test_history_config_resolves_head_memory_to_the_window(tmp_path):
    cfg = load_config(ROOT / "configs/debug_history.yaml")
    assert (cfg.data.window_size, cfg.model.history_type, cfg.model.head.type) == (2, "post", "gpt")
    assert cfg.model.head.max_history == 2  # 0 in the file: follows data.window_size
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert load_config(ROOT / "configs/debug_history.yaml", ["data.window_size=4"]).model.head.max_history == 4


# --- each section on its own, under the prefix it is given --------------------------------------------------
@pytest.mark.parametrize(
    "section, prefix, pattern",
    [
        (DataConfig(), "data", r"data\.sources is empty: list at least one dataset folder"),
        (DataConfig(sources=[SourceConfig(path="")]), "data", r"data\.sources\.0\.path is empty"),
        (DataConfig(sources=[SourceConfig("a", 0.0)]), "data", r"data\.sources: at least one weight must be > 0"),
        (DataConfig(sources=[SourceConfig("a")], num_workers=-1), "data", r"data\.num_workers must be >= 0"),
        (AugmentConfig(crop_scale=[0.9, 0.5]), "data.augment", r"data\.augment\.crop_scale must be \[low, high\]"),
        (AugmentConfig(brightness=-0.1), "data.augment", r"data\.augment\.brightness must be >= 0"),
        (ModelConfig(), "model", r"model\.backbone\.pretrained is empty"),
        (ModelConfig(latent_num=0), "policy", r"policy\.latent_num must be >= 1"),
        (TrainConfig(bf16=True, fp16=True), "train", r"train\.bf16 and train\.fp16 are both on; pick one"),
        (TrainConfig(offload_optimizer=True, zero_stage=0), "train", r"offload_optimizer needs ZeRO: set train\.zero"),
        (TrainConfig(offload_params=True), "train", r"train\.offload_params needs ZeRO-3: set train\.zero_stage=3"),
        (TrainConfig(max_bad_steps=0), "train", r"train\.max_bad_steps must be >= 1, got 0"),
        (TrainConfig(stages=[StageConfig(start_step=5)]), "train", r"train\.stages\.0\.start_step must be 0"),
        (
            TrainConfig(stages=[StageConfig(), StageConfig(start_step=0)]),
            "train",
            r"train\.stages\.1\.start_step \(0\) must be greater than the previous stage's",
        ),
        (StageConfig(lr_scale=0), "train.stages.2", r"train\.stages\.2\.lr_scale must be > 0"),
        (StageConfig(trainable=[]), "train.stages.0", r"train\.stages\.0\.trainable is empty"),
        (StageConfig(trainable=["hedas"]), "train.stages.0", r"unknown parameter group 'hedas'.*Did you mean 'heads'"),
        (LoraConfig(enabled=True, r=0), "model.lora", r"model\.lora needs r >= 1 and alpha > 0, got r=0"),
        (LoraConfig(enabled=True, dropout=1.0), "model.lora", r"model\.lora\.dropout must be in \[0, 1\)"),
        (LoraConfig(enabled=True, target_modules=[]), "model.lora", r"model\.lora\.target_modules is empty"),
        (ClipRegConfig(tiny=TinyClipConfig(num_heads=0)), "m.clip_reg", r"m\.clip_reg\.tiny\.num_heads \(0\)"),
    ],
)
def test_each_section_checks_itself_under_its_full_key(section, prefix, pattern):
    with pytest.raises(ConfigError, match=pattern):
        section.validate(prefix)


def test_valid_sections_pass_and_a_disabled_lora_block_is_not_checked():
    DataConfig(sources=[SourceConfig("a")]).validate("data")
    TrainConfig(stages=[StageConfig(), StageConfig(start_step=5, trainable=["decoder_last_2", "re:.*norm"])]).validate()
    LoraConfig(enabled=False, r=0).validate()


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["train.stages=[{trainable: [lora]}]"], r"train\.stages\.0\.trainable names 'lora' but model\.lora\.enabled"),
        (["optim.betas=[0.9]"], r"optim\.betas needs two numbers"),
        (["optim.min_lr_ratio=2"], r"optim\.min_lr_ratio must be in \[0, 1\]"),
        (["model.discrete.n_bin=1"], r"model\.discrete\.n_bin must be >= 2"),
        (["model.discrete.min_action=1"], r"model\.discrete\.min_action \(1\.0\) must be < model\.discrete\.max"),
        (["train.log_every=0"], r"train\.log_every must be >= 1, got 0"),
    ],
)
def test_cross_section_and_remaining_checks_at_load(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(ROOT / "configs/debug.yaml", overrides)


def test_config_fills_the_head_memory_from_the_window_when_built():
    """The derived default lives in the schema: any `Config`, not only a loaded one, gets it."""
    model = ModelConfig(head=ActionHeadConfig(type="lstm"))
    cfg = Config(data=DataConfig(sources=[SourceConfig("a")], window_size=3), model=model)
    assert cfg.model.head.max_history == 3
    mlp = Config(data=DataConfig(window_size=3))
    assert mlp.model.head.max_history == 0  # an mlp head keeps no memory: nothing to fill


def test_world_size_check_names_the_keys_and_the_fix():
    cfg = load_config(ROOT / "configs/debug.yaml")  # global 8, micro 2
    validate(cfg, 2)
    cfg.validate(4)
    with pytest.raises(ConfigError, match=r"train\.global_batch_size \(8\) must be a multiple of .* \(2 x 3\); change"):
        validate(cfg, 3)
    assert cfg.train.grad_accum(2) == 2 and cfg.train.grad_accum(1) == 4


def test_fast_tokenizer_with_a_remote_dataset_needs_an_explicit_local_path(tmp_path):
    """`Path("s3://b/ds")` would mangle the URL into `s3:/b/ds`: no default beside a remote source, and no URL."""
    fast = ["model.action_space=discrete", "model.discrete.tokenizer=fast"]
    for url in ("s3://bucket/ds", "https://host/ds", "pipe:cat /data/{}"):
        with pytest.raises(
            ConfigError, match=rf"fast_path: data source {url} is remote.*set model\.discrete\.fast_path"
        ):
            load_config(ROOT / "configs/debug.yaml", [*fast, f"data.sources=[{{path: '{url}'}}]"])
    given = tmp_path / "fast_tokenizer.json"
    cfg = load_config(
        ROOT / "configs/debug.yaml", [*fast, "data.sources=[{path: 's3://b/ds'}]", f"model.discrete.fast_path={given}"]
    )
    assert cfg.model.discrete.fast_path == str(given)
    with pytest.raises(ConfigError, match=r"fast_path: s3://b/f\.json must be a local file"):
        validate(load_config(ROOT / "configs/debug.yaml", [*fast, "model.discrete.fast_path=s3://b/f.json"]), 1)
