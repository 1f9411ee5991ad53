from setuptools import find_packages, setup

setup(
    name="yolact-d2",
    version="0.1.0",
    description="YOLACT and YOLACT++ real-time instance segmentation as a detectron2 plugin",
    packages=find_packages(include=["yolact_d2", "yolact_d2.*"]),
    python_requires=">=3.9",
    # detectron2 itself is installed by scripts/install.sh (it has no PyPI release of its own name).
    # torch 2.4: torch.load(weights_only=True) with the allow-list API the safe loader relies on.
    install_requires=["torch>=2.4", "torchvision", "pycocotools", "opencv-python-headless", "numpy"],
)
