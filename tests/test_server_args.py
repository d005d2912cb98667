"""`prmserve serve`'s vLLM flags: each parses and lands in `PRM(...)` or the server settings, without starting a server."""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from prmserve import cli
from prmserve.engine.config import EngineConfig
from prmserve.models.attention import BACKENDS
from prmserve.server.args import ATTENTION_BACKENDS, ENGINE_DEFAULTS, TRUST_REMOTE_CODE_NOTE, prm_options, server_settings


def parse(*argv: str):
    return cli.build_parser().parse_args(["serve", *argv])


def test_every_vllm_flag_lands_where_it_should(tmp_path: Path) -> None:
    args = parse(
        "org/model", "--gpu-memory-utilization", "0.5", "--max-model-len", "2048", "--max-num-seqs", "8",
        "--max-num-batched-tokens", "512", "--no-enable-prefix-caching", "--enforce-eager", "--block-size", "8",
        "--dtype", "half", "--served-model-name", "prm", "prm-alias", "--chat-template", "{{ messages }}",
        "--uvicorn-log-level", "debug", "--disable-log-requests", "--root-path", "/api",
        "--allowed-origins", '["http://a.example", "http://b.example"]', "--ssl-keyfile", "k.pem", "--ssl-certfile", "c.pem",
        "--seed", "7", "-tp", "2", "--trust-remote-code", "--host", "0.0.0.0", "--port", "9000", "--api-key", "k",
        "--device", "cpu", "--format", "qwen_prm", "--option", "system_prompt=Be brief", "--no-deterministic",
        "--attention-backend", "flash_attn",
    )
    assert prm_options(args) == {
        "format": "qwen_prm", "device": "cpu", "dtype": "float16", "enforce_eager": True, "tensor_parallel_size": 2,
        "max_num_batched_tokens": 512, "max_num_seqs": 8, "block_size": 8, "gpu_memory_utilization": 0.5,
        "enable_prefix_caching": False, "max_queue": 1024, "system_prompt": "Be brief",
        "revision": None, "download_dir": None, "tokenizer": None, "deterministic": False,
        "attention_backend": "FLASH_ATTN",
    }
    settings = server_settings(args)
    assert (settings.host, settings.port, settings.root_path) == ("0.0.0.0", 9000, "/api")
    assert settings.served_model_names == ["prm", "prm-alias"] and settings.max_model_len == 2048
    assert settings.log_level == "debug" and settings.log_requests is False
    assert settings.allowed_origins == ["http://a.example", "http://b.example"]
    assert (settings.ssl_keyfile, settings.ssl_certfile) == ("k.pem", "c.pem")
    assert settings.chat_template == "{{ messages }}" and settings.api_key == "k"
    assert settings.notes == [TRUST_REMOTE_CODE_NOTE]
    assert args.seed == 7 and args.model == "org/model"


def test_defaults_are_the_engines_and_the_old_names_stay_as_aliases() -> None:
    args = parse()
    options = prm_options(args)
    assert options["attention_backend"] == "AUTO" and ATTENTION_BACKENDS == BACKENDS
    engine = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    assert {k: options[k] for k in ENGINE_DEFAULTS} == {k: engine[k] for k in ENGINE_DEFAULTS}
    assert options["enable_prefix_caching"] is True and options["dtype"] == "auto" and options["enforce_eager"] is False
    settings = server_settings(args)
    assert settings.log_requests and settings.allowed_origins is None and settings.served_model_names is None
    old = parse("--no-prefix-caching", "--log-level", "warning", "--max-queue", "4", "--request-timeout", "2.5",
                "--max-body-bytes", "100", "--api-key", "secret")
    assert prm_options(old)["enable_prefix_caching"] is False and prm_options(old)["max_queue"] == 4
    settings = server_settings(old)
    assert (settings.log_level, settings.default_timeout, settings.max_body_bytes, settings.api_key) == ("warning", 2.5, 100, "secret")


@pytest.mark.parametrize(("given", "dtype"), [("auto", "auto"), ("half", "float16"), ("float16", "float16"),
                                              ("bfloat16", "bfloat16"), ("float", "float32"), ("float32", "float32")])
def test_dtype_names(given: str, dtype: str) -> None:
    assert prm_options(parse("--dtype", given))["dtype"] == dtype


def test_help_shows_defaults(capsys) -> None:
    with pytest.raises(SystemExit):
        parse("--help")
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 16384)", "(default: 0.85)", "(default: 256)", "(default: 8000)", "(default: True)"):
        assert default in text


def test_config_file_keys_take_dashes_or_underscores_and_the_command_line_wins(tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(
        "port: 9100\nmax_num_seqs: 4\nmax-num-batched-tokens: 64\nenable_prefix_caching: false\nenforce-eager: true\n"
        "served_model_name: [a, b]\nallowed_origins: ['http://x.example']\ndtype: half\n"
    )
    args = parse("m", "--port", "9200", "--config", str(config), "--max-num-seqs", "2")
    options, settings = prm_options(args), server_settings(args)
    assert settings.port == 9200 and options["max_num_seqs"] == 2  # the command line, before or after --config
    assert options["max_num_batched_tokens"] == 64 and options["enable_prefix_caching"] is False
    assert options["enforce_eager"] is True and options["dtype"] == "float16"
    assert settings.served_model_names == ["a", "b"] and settings.allowed_origins == ["http://x.example"]
    assert parse("--config=" + str(config), "--enable-prefix-caching").enable_prefix_caching is True


def test_config_file_with_an_unknown_key_is_refused(tmp_path: Path, capsys) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("max_num_sequences: 4\n")
    with pytest.raises(SystemExit):
        parse("--config", str(config))
    assert "unknown key 'max_num_sequences'" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--max-model-len", "0"], "--max-model-len must be >= 1"),
    (["--ssl-keyfile", "k.pem"], "--ssl-keyfile and --ssl-certfile go together"),
])
def test_flags_prmserve_cannot_honour_exit_with_one_line_before_loading(argv: list[str], message: str, capsys) -> None:
    assert cli.main(["serve", "/no/such/model", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_chat_template_is_a_file_or_the_template_itself(tmp_path: Path) -> None:
    from prmserve.server.serve import read_chat_template

    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert read_chat_template(str(path)) == path.read_text()
    assert read_chat_template("{{ messages[0].content }}") == "{{ messages[0].content }}"
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        read_chat_template(str(tmp_path / "missing.jinja"))


def test_base64_rows_are_vllms_flattened_bytes() -> None:
    from prmserve.server.encoding import rows_to_base64

    rows = [[0.25, 0.75], [0.5, 0.5], [1e-3, 0.999]]
    flat = np.array(rows, dtype=np.float32).flatten()
    assert np.array_equal(np.frombuffer(base64.b64decode(rows_to_base64(rows, "float32", "little")), "<f4"), flat)
    assert np.array_equal(np.frombuffer(base64.b64decode(rows_to_base64(rows, "float32", "big")), ">f4"), flat)
    assert np.array_equal(np.frombuffer(base64.b64decode(rows_to_base64(rows)), "=f4"), flat)
    assert np.allclose(np.frombuffer(base64.b64decode(rows_to_base64(rows, "float16", "little")), "<f2"), flat, atol=1e-3)


def test_hub_flags_reach_the_loader(tmp_path: Path, monkeypatch) -> None:
    """--revision and --download-dir go to snapshot_download; --tokenizer loads another checkpoint's tokenizer."""
    import huggingface_hub

    from prmserve.errors import CheckpointError
    from prmserve.models.loader import resolve_checkpoint

    args = parse("org/model", "--revision", "v2", "--download-dir", str(tmp_path), "--tokenizer", "org/tok")
    options = prm_options(args)
    assert (options["revision"], options["download_dir"], options["tokenizer"]) == ("v2", str(tmp_path), "org/tok")
    seen = {}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: seen.update(kw) or str(tmp_path))
    assert resolve_checkpoint("org/model", options["revision"], options["download_dir"]) == tmp_path
    assert seen["repo_id"] == "org/model" and seen["revision"] == "v2" and seen["cache_dir"] == str(tmp_path)
    with pytest.raises(CheckpointError, match="applies to hub IDs"):
        resolve_checkpoint(tmp_path, "v2")


def test_tokenizer_of_another_directory_is_used(qwen_prm_dir: Path, tmp_path: Path) -> None:
    import shutil

    from prmserve import PRM

    other = tmp_path / "tok"
    other.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (qwen_prm_dir / name).is_file():
            shutil.copy(qwen_prm_dir / name, other / name)
    config = (other / "tokenizer_config.json").read_text().replace('"chat_template"', '"chat_template_unused"')
    (other / "tokenizer_config.json").write_text(config)
    prm = PRM(str(qwen_prm_dir), device="cpu", tokenizer=str(other))
    try:
        assert not getattr(prm.tokenizer, "chat_template", None)  # the other directory's, without a template
    finally:
        prm.close()
