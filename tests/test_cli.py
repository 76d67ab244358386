"""The main job's command line: `vllm-hip serve` selects INFINITEHIP and a long context by default."""

from vllm_hip.cli import serve_command


def test_serve_adds_backend_and_context_defaults():
    line = serve_command(["/models/m", "--port", "9"])
    assert line[line.index("serve") + 1] == "/models/m"
    assert line[line.index("--attention-backend") + 1] == "INFINITEHIP"
    assert line[line.index("--max-model-len") + 1] == "131072"


def test_serve_keeps_user_choices():
    line = serve_command(["/models/m", "--attention-backend=FLASH_ATTN", "--max-model-len", "8192"])
    assert "--attention-backend=FLASH_ATTN" in line and line.count("--max-model-len") == 1
    assert "INFINITEHIP" not in line


def test_serve_adds_the_json_body_guard_once():
    from vllm_hip.cli import JSON_GUARD

    line = serve_command(["/models/m"])
    assert line[line.index("--middleware") + 1] == JSON_GUARD
    assert serve_command(["/models/m", f"--middleware={JSON_GUARD}"]).count("--middleware") == 0
