"""Remake the README's pictures, assets/<script>.png, from the bare commands' checkpoints.

    python boqsa.py; python mincut_ocl.py; python ast_seg.py     # train: out/<script>/ckpt.pt
    python figures.py                                            # evaluate 8 test images, write assets/

Each picture is the first four rows of the script's own `--eval_only` figure (eval_samples.png): input,
reconstruction, predicted segmentation (each segment in the colour of the true object it is matched to, as
mIoU; background black) and true segmentation, 8 test images, enlarged 3x (nearest neighbour).
"""
import os
import sys
import tempfile

from PIL import Image, ImageFont

import common

SCRIPTS = ("boqsa", "mincut_ocl", "ast_seg")
ROWS, SCALE = 4, 3


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    names = argv or SCRIPTS
    os.makedirs("assets", exist_ok=True)
    for name in names:
        ckpt = os.path.join("out", name, "ckpt.pt")
        if not os.path.exists(ckpt):
            common.fail(f"{ckpt} not found: run `python {name}.py` first")
        module = __import__(name)
        with tempfile.TemporaryDirectory() as tmp:
            module.main(["--eval_only", f"--ckpt={ckpt}", "--test_items=8", "--num_workers=0", f"--out_dir={tmp}"])
            with Image.open(os.path.join(tmp, "eval_samples.png")) as grid:
                side = common.load_checkpoint(ckpt)["config"]["image_size"]
                row_h = max(side, ImageFont.load_default().getbbox("Ag")[3])
                top = grid.crop((0, 0, grid.width, 2 + ROWS * (row_h + 2))).convert("RGB")
                top = top.resize((top.width * SCALE, top.height * SCALE), Image.NEAREST)
                path = os.path.join("assets", f"{name}.png")
                top.save(path, optimize=True)
        print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KB) from {ckpt} (step {common.checkpoint_step(ckpt)})")


if __name__ == "__main__":
    main()
