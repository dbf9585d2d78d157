"""Packaging for grl_plugin (GRL image restoration as a BasicSR plugin).

Install with the constraint file so basicsr's isolated sdist build gets the CPU torch:
    PIP_CONSTRAINT=$PWD/constraints.txt pip install -e .[test,demo]
(``make venv`` does this.)
"""
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(HERE, 'grl_plugin', '__init__.py'), encoding='utf-8') as f:
        match = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", f.read(), re.M)
    if not match:
        raise RuntimeError('__version__ not found in grl_plugin/__init__.py')
    return match.group(1)


def read_readme():
    path = os.path.join(HERE, 'README.md')
    if not os.path.exists(path):
        return ''
    with open(path, encoding='utf-8') as f:
        return f.read()


setup(
    name='grl_plugin',
    version=read_version(),
    description='GRL image-restoration transformer as a BasicSR plugin',
    long_description=read_readme(),
    long_description_content_type='text/markdown',
    packages=find_packages(exclude=['tests', 'tests.*']),
    include_package_data=True,
    python_requires='>=3.9',
    install_requires=[
        'torch>=2.1',
        'basicsr==1.4.2',
        'einops',
        'pyyaml',
        'opencv-python',
        'lmdb',
        'numpy',
        'scipy<2',
        'safetensors',
    ],
    extras_require={
        'test': ['pytest', 'hypothesis', 'scikit-image', 'onnx', 'onnxruntime'],
        'demo': ['scikit-image'],
        'onnx': ['onnx', 'onnxruntime'],
    },
    entry_points={
        'console_scripts': [
            'grl-convert=grl_plugin.cli.convert:main',
            'grl-demo=grl_plugin.cli.demo:main',
            'grl-train=grl_plugin.cli.train:main',
            'grl-test=grl_plugin.cli.test:main',
            'grl-prepare=grl_plugin.cli.prepare:main',
            'grl-infer=grl_plugin.cli.infer:main',
            'grl-export=grl_plugin.cli.export:main',
            'grl-zoo=grl_plugin.cli.zoo:main',
        ],
    },
)
