"""The Gradio demo, started on a free localhost port and driven with gradio_client as a user would:
a generation (dense and radial side by side, with metrics and the block map), an invalid input
(one clear message, nothing generated) and the mask view; and ``diffattn mask`` without weights."""

import socket

import pytest

pytestmark = pytest.mark.cpu


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def client():
    pytest.importorskip("gradio")
    from gradio_client import Client

    from diffattn.app.demo import Models, build

    demo = build(Models("cpu"))
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        demo.close()


ARGS = dict(kind="video", method="radial", options='{"dense_steps": 1, "block_size": 64}', guide="none", guide_options="{}",
            prompt="a red circle moving right on a dark blue background", seed=0, steps=2, size=64, frames=9, guidance=3.0)


def test_generation_shows_dense_and_the_method_side_by_side(client):
    dense, method, _, _, metrics, mask, caption, layers, steps = client.predict(*ARGS.values(), api_name="/generate")
    assert dense["value"].endswith(".mp4") and method["value"].endswith(".mp4") and dense["value"] != method["value"]
    assert "mask density" in metrics and "PSNR / SSIM vs dense" in metrics and "judge: motion" in metrics
    # 2 steps x (cond + uncond) x 6 layers: step 1 dense, then layer 0 dense (Wan's dense_layers=1)
    assert "| attention calls sparse / dense | | 10 / 14 |" in metrics
    assert mask.endswith(".png") and "density" in caption
    assert [row[0] for row in layers["data"]][:2] == ["transformer.blocks.0.attn1.processor", "transformer.blocks.1.attn1.processor"]
    assert [row[:3] for row in steps["data"]] == [[1, 0, 12], [2, 10, 2]]  # step 1 dense (dense_steps=1), then radial
    assert 0 < steps["data"][1][3] < 1 and steps["data"][0][3] == ""


@pytest.mark.parametrize("change, message", [
    (dict(prompt="a red dragon moving left"), "do not know the words dragon; use caption words"),
    (dict(size=72), "size must be a multiple of 16"),
    (dict(frames=10), "frames must be 4k\\+1"),
    (dict(options='{"decay": -1}'), "decay"),
    (dict(options='{"dense_steps": 5}'), "never run"),
    (dict(options="{decay: 1"), "JSON object"),
    (dict(method="none"), "just dense; pick a method or a guidance"),
    (dict(guide="soft-pag", guide_options='{"u": 2}'), "u"),
    (dict(guide="pag", guide_options='{"layers": [99]}'), "out of range"),
])
def test_invalid_input_gets_one_clear_message(client, change, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        client.predict(*{**ARGS, **change}.values(), api_name="/generate")


def test_guidance_alone_and_with_the_method(client):
    args = dict(ARGS, method="none", options="{}", guide="soft-pag", guide_options='{"scale": 1.0}')
    dense, method, _, _, metrics, mask, caption, layers, steps = client.predict(*args.values(), api_name="/generate")
    assert "| dense | soft-pag |" in metrics and "weak-branch forwards (soft-pag) | | 2 |" in metrics
    assert mask is None and "guidance only" in caption
    assert "| attention calls sparse / dense | | 0 / " in metrics  # no sparse method: every call stock
    args = dict(ARGS, guide="stg", guide_options='{"scale": 1.0}')
    dense, method, _, _, metrics, mask, caption, layers, steps = client.predict(*args.values(), api_name="/generate")
    assert "| dense | radial+stg |" in metrics and "weak-branch forwards (stg)" in metrics and mask.endswith(".png")


def test_mask_view(client):
    picture, caption = client.predict("video", "neighborhood", '{"kernel_size": [3, 5, 5]}', 128, 29, api_name="/mask")
    assert picture.endswith(".png") and "TokenLayout(F=8, Y=16, X=16)" in caption


def test_unet_generation_and_window_view(client):
    args = dict(ARGS, kind="image-unet", method="hidiffusion", options='{"seed": 1}', prompt="a red circle", size=256, steps=4)
    dense, method, dense_img, method_img, metrics, mask, caption, layers, steps = client.predict(*args.values(), api_name="/generate")
    assert "judge: count" in metrics and "PSNR / SSIM vs dense" in metrics
    assert mask.endswith(".png") and "2 x 2 windows" in caption
    assert any(row[0] == "unet.down_blocks.0.downsamplers.0.conv" and row[2] > 0 for row in layers["data"])  # RAU-Net ran
    picture, caption = client.predict("image-unet", "tome", "{}", 256, 29, api_name="/mask")
    assert picture is None and "no attention mask" in caption


def test_mask_command_prints_density_and_writes_the_picture(tmp_path, capsys):
    import imageio.v3 as iio

    from diffattn.app import cli

    out = tmp_path / "mask.png"
    info = cli.mask(["--model", "wan", "--height", "720", "--width", "1280", "--frames", "81", "--method", "radial", "--out", str(out)])
    assert abs(info["density"] - 0.264) < 0.001 and info["blocks"] == (591, 591)  # Wan2.1-14B 720p, research radial.md
    assert iio.imread(out).shape == (591, 591, 3) and "density 0.2637" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--frames must be 4k\\+1 for wan, got 80; nearest: 77 or 81"):
        cli.mask(["--model", "wan", "--frames", "80", "--out", str(out)])
    with pytest.raises(SystemExit, match="radial does not fit the flux family; methods for it: \\['clear', 'neighborhood'\\]"):
        cli.mask(["--model", "flux", "--method", "radial", "--out", str(out)])
