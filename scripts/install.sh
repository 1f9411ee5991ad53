#!/usr/bin/env bash
# Installs yolact-d2 and what it needs into the Python that runs this script
# (${PYTHON:-python}; use it inside a virtual environment). Package registries only, no compile step.
#
# detectron2 has no release on PyPI under its own name. When one already imports (a user's own
# source build, say) it is kept. Otherwise the PyPI build `sal-detectron2==0.7.2` (detectron2's
# main branch, 2024) is used: its only wheel is tagged cp310, but its Python code runs on 3.11, so
# the wheel is installed under a py3 file name. Its compiled `_C` stays unusable on 3.11; yolact-d2
# never needs it (torchvision ops instead, and detectron2 falls back to pycocotools' COCOeval).
set -euo pipefail
PY=${PYTHON:-python}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

# torch/torchvision first: this machine kind has these exact wheels on disk.
if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
  pip_install "torch==2.14.1" "torchvision==0.29.1"
fi
# detectron2's own requirements, pinned where detectron2 0.7 needs it (numpy<2, pkg_resources);
# shapely: detectron2's CropTransform clips polygons with it. onnx/onnxruntime/openvino: tools/export_model.py
# and the exported-model runtimes; onnx 1.18+ needs ml_dtypes built for numpy 2, hence <1.18;
# ml_dtypes 0.4 (numpy 1 builds): onnxruntime's quantization tools (--quantize int8) import it.
pip_install "numpy<2" "setuptools<80" "pycocotools>=2.0.2" "opencv-python-headless<5" \
  "Pillow>=7.1" matplotlib "termcolor>=1.1" "yacs>=0.1.8" tabulate cloudpickle "tqdm>4.29.0" \
  tensorboard "omegaconf>=2.1,<2.4" "hydra-core>=1.1" packaging fvcore iopath black \
  shapely imgviz pytest \
  "onnx>=1.16,<1.18" "onnxruntime>=1.17" "openvino>=2024.0" "ml_dtypes>=0.4,<0.5"
# tidecv (TEST.TIDE, yolact_d2/tide.py) without its opencv-python requirement, which would pull numpy 2
# and a second OpenCV: the headless one above serves it; its plots need seaborn and pandas (numpy 1 builds).
pip_install --no-deps tidecv==1.0.1 appdirs
pip_install seaborn "pandas<2.3" "numpy<2"
if ! "$PY" -c "import detectron2.modeling" 2>/dev/null; then
  tmp=$(mktemp -d)
  "$PY" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
    --python-version 3.10 -d "$tmp" "sal-detectron2==0.7.2"
  whl=$(ls "$tmp"/sal_detectron2-0.7.2-*.whl)
  mv "$whl" "$tmp/sal_detectron2-0.7.2-py3-none-any.whl"
  pip_install --no-deps "$tmp/sal_detectron2-0.7.2-py3-none-any.whl"
  rm -rf "$tmp"
fi
pip_install --no-deps --no-build-isolation -e "$here"
"$PY" -c "import detectron2, yolact_d2, torch; print('yolact-d2 ready: detectron2', detectron2.__version__, 'torch', torch.__version__)"
