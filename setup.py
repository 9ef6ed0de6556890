"""Installs the on-device learning research codebase.

    pip install -e '.[test]'          # library + pytest (+ fedjax for interop)
    pip install -e '.[test,tfds]'     # + tensorflow-cpu for TFDS audio builders
    pip install -e '.[fedjax]'        # + fedjax, for interop and the comparison benchmark
"""
import setuptools

setuptools.setup(
    name='ondevice-learning',
    version='0.1.0',
    description=('Pure-JAX research code for learning on devices: federated '
                 'rounds, int8 training, sparse updates, few-shot and '
                 'continual personalisation.'),
    python_requires='>=3.10',
    packages=setuptools.find_packages(
        include=['ondevice*', 'central*', 'fedjax_ext*', 'quantized_training*',
                 'sparse_updates*', 'few_shot*', 'continual*',
                 'third_party*', 'configs*', 'experiments*']),
    install_requires=[
        'jax>=0.4.30',
        'flax>=0.8',
        'optax>=0.2',
        'absl-py',
        'ml-collections',
        'chex',
        'orbax-checkpoint',
        'tensorflow-datasets',
        'numpy',
        'scipy',
        'matplotlib',
        'tensorboardX',
        'dp-accounting',
        'pyroomacoustics',
    ],
    extras_require={
        'test': ['pytest', 'pytest-xdist', 'fedjax'],
        'tfds': ['tensorflow-cpu'],
        'fedjax': ['fedjax'],
        'bench': ['aqtp'],
    },
)
