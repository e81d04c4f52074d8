"""EfficientNet-Lite in plain TensorFlow ops, built from a PyTorch state dict.

The state dict uses lukemelas' EfficientNet-PyTorch names (``_conv_stem``,
``_blocks.{i}._expand_conv`` ...).  The architecture is read from the weight
shapes rather than hard-coded, so lite0, lite1 and lite2 share this code:

* stem: 3x3 conv, stride 2, BN, ReLU6;
* MBConv blocks: optional 1x1 expand conv, k x k depthwise conv, 1x1 linear
  projection, identity skip when stride is 1 and channels are unchanged; no
  squeeze-and-excitation (the "lite" variants drop it and use ReLU6);
* a block whose input and output channels differ starts one of the 7 stages,
  whose first blocks have strides (1, 2, 2, 2, 1, 2, 1);
* head: 1x1 conv, BN, ReLU6, global average pool -> features; ``_fc`` -> logits.

The weights were converted from Google's TF checkpoints into ml-illustrated's
fork of that code, whose static "same" padding equals TensorFlow's ``'SAME'``.
BatchNorm (eps 1e-3) is folded into the preceding conv, so every layer is
conv + bias (+ ReLU6), which grappler fuses into one oneDNN CPU kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from retrieval.builtin.torch_legacy import WeightsFileError

BN_EPSILON = 1e-3
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
STEM_STRIDE = 2
# The networks were trained on (255 * x - 127) / 128 for RGB x in [0, 1].
INPUT_SCALE = 255.0 / 128.0
INPUT_OFFSET = -127.0 / 128.0
PREPROCESSING = (
    "input: float32 RGB in [0, 1], shape [batch, height, width, 3]; "
    "the model applies (255 * x - 127) / 128 itself; resize images to the "
    "native input size beforehand"
)


@dataclass(frozen=True)
class BlockSpec:
    index: int
    in_channels: int
    out_channels: int
    expand: bool
    kernel_size: int
    stride: int

    @property
    def skip(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


class _StateDict:
    """Hands out tensors by name with shape checks, and reports unused ones."""

    def __init__(self, state: dict[str, np.ndarray]) -> None:
        self._state = state
        self._used: set[str] = set()

    def take(self, name: str, shape: tuple) -> np.ndarray:
        """Return tensor `name`; `None` entries in `shape` match any size."""
        if name not in self._state:
            raise WeightsFileError(f"EfficientNet-Lite state dict lacks {name!r}")
        value = self._state[name]
        if value.ndim != len(shape) or any(
            want is not None and have != want for have, want in zip(value.shape, shape)
        ):
            raise WeightsFileError(f"{name!r} has shape {value.shape}, expected {tuple(shape)} (None = any)")
        self._used.add(name)
        return value.astype(np.float32)

    def check_all_used(self) -> None:
        # Unknown weights (e.g. squeeze-and-excitation) mean a different network.
        unused = sorted(
            k for k in self._state if k not in self._used and not k.endswith(".num_batches_tracked")
        )
        if unused:
            raise WeightsFileError(
                f"state dict has weights EfficientNet-Lite does not use: {unused[:5]}"
                + (" ..." if len(unused) > 5 else "")
            )


def _conv_shape(state: dict[str, np.ndarray], name: str) -> tuple[int, ...]:
    if name not in state or state[name].ndim != 4:
        raise WeightsFileError(f"EfficientNet-Lite state dict lacks a 4-D conv weight {name!r}")
    return state[name].shape


def parse_blocks(state: dict[str, np.ndarray]) -> list[BlockSpec]:
    """Derive the MBConv blocks (channels, kernel, expand, stride) from weight shapes."""
    raw: list = []
    while f"_blocks.{len(raw)}._depthwise_conv.weight" in state:
        prefix = f"_blocks.{len(raw)}."
        hidden, _, k, _ = _conv_shape(state, prefix + "_depthwise_conv.weight")
        expand = prefix + "_expand_conv.weight" in state
        in_channels = _conv_shape(state, prefix + "_expand_conv.weight")[1] if expand else hidden
        out_channels = _conv_shape(state, prefix + "_project_conv.weight")[0]
        raw.append((in_channels, out_channels, expand, k))
    starts = [i for i, (cin, cout, _, _) in enumerate(raw) if cin != cout]
    if len(starts) != len(STAGE_STRIDES) or starts[:1] != [0]:
        raise WeightsFileError(
            f"expected {len(STAGE_STRIDES)} EfficientNet-Lite stages starting at block 0, "
            f"found stage starts {starts} among {len(raw)} blocks"
        )
    strides = dict(zip(starts, STAGE_STRIDES))
    return [
        BlockSpec(i, cin, cout, expand, k, strides.get(i, 1)) for i, (cin, cout, expand, k) in enumerate(raw)
    ]


def _fold_bn(weights: _StateDict, conv: str, bn: str, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Return (OIHW kernel, bias) of conv `conv` followed by inference-mode BN `bn`."""
    kernel = weights.take(conv + ".weight", shape)
    channels = (kernel.shape[0],)
    # float64 so that folding adds no rounding error of its own.
    gamma, beta, mean, var = (
        weights.take(f"{bn}.{field}", channels).astype(np.float64)
        for field in ("weight", "bias", "running_mean", "running_var")
    )
    scale = gamma / np.sqrt(var + BN_EPSILON)
    return (
        (kernel * scale[:, None, None, None]).astype(np.float32),
        (beta - mean * scale).astype(np.float32),
    )


class _Conv(tf.Module):
    """Conv (regular or depthwise) + bias + optional ReLU6, 'SAME' padding, NHWC.

    Weights are stored in float32 and cast to `compute_dtype` in the graph, so a bfloat16
    export keeps full-precision variables in its checkpoint.
    """

    def __init__(
        self,
        kernel_oihw: np.ndarray,
        bias: np.ndarray,
        stride: int,
        *,
        depthwise: bool,
        relu6: bool,
        name: str,
        compute_dtype: tf.DType = tf.float32,
    ) -> None:
        super().__init__(name=name)
        self._dtype = compute_dtype
        # TF layouts: conv2d wants HWIO; depthwise_conv2d wants [k, k, C, multiplier].
        layout = (2, 3, 0, 1) if depthwise else (2, 3, 1, 0)
        self.kernel = tf.Variable(np.ascontiguousarray(kernel_oihw.transpose(layout)), name="kernel")
        self.bias = tf.Variable(bias, name="bias")
        self._strides = [1, stride, stride, 1]
        self._depthwise = depthwise
        self._relu6 = relu6

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        kernel, bias = tf.cast(self.kernel, self._dtype), tf.cast(self.bias, self._dtype)
        if self._depthwise:
            y = tf.nn.depthwise_conv2d(x, kernel, self._strides, "SAME")
        else:
            y = tf.nn.conv2d(x, kernel, self._strides, "SAME")
        y = tf.nn.bias_add(y, bias)
        return tf.nn.relu6(y) if self._relu6 else y


class _MBConv(tf.Module):
    """Inverted residual block: [1x1 expand] -> k x k depthwise -> 1x1 linear projection."""

    def __init__(self, spec: BlockSpec, weights: _StateDict, compute_dtype: tf.DType = tf.float32) -> None:
        super().__init__(name=f"block{spec.index}")
        p = f"_blocks.{spec.index}."
        hidden = spec.in_channels
        self.expand = None
        if spec.expand:
            kernel, bias = _fold_bn(weights, p + "_expand_conv", p + "_bn0", (None, spec.in_channels, 1, 1))
            hidden = kernel.shape[0]
            self.expand = _Conv(
                kernel, bias, 1, depthwise=False, relu6=True, name="expand", compute_dtype=compute_dtype
            )
        kernel, bias = _fold_bn(
            weights, p + "_depthwise_conv", p + "_bn1", (hidden, 1, spec.kernel_size, spec.kernel_size)
        )
        self.depthwise = _Conv(
            kernel,
            bias,
            spec.stride,
            depthwise=True,
            relu6=True,
            name="depthwise",
            compute_dtype=compute_dtype,
        )
        kernel, bias = _fold_bn(weights, p + "_project_conv", p + "_bn2", (spec.out_channels, hidden, 1, 1))
        self.project = _Conv(
            kernel, bias, 1, depthwise=False, relu6=False, name="project", compute_dtype=compute_dtype
        )
        self._skip = spec.skip

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self._skip else y


class EfficientNetLite(tf.Module):
    """The network with folded BatchNorm; images are float32 RGB in [0, 1], NHWC.

    compute_dtype bfloat16 runs the convolutions in bfloat16 (faster on CPUs with
    AVX512_BF16, features close to float32's); input, pooling and outputs stay float32.
    """

    def __init__(
        self,
        state: dict[str, np.ndarray],
        *,
        feature_dim: int,
        num_classes: int,
        compute_dtype: tf.DType = tf.float32,
    ) -> None:
        super().__init__(name="efficientnet_lite")
        self._dtype = compute_dtype
        weights = _StateDict(state)
        blocks = parse_blocks(state)
        kernel, bias = _fold_bn(weights, "_conv_stem", "_bn0", (None, 3, 3, 3))
        if kernel.shape[0] != blocks[0].in_channels:
            raise WeightsFileError("stem channels do not match the first block")
        self.stem = _Conv(
            kernel, bias, STEM_STRIDE, depthwise=False, relu6=True, name="stem", compute_dtype=compute_dtype
        )
        for previous, block in zip(blocks, blocks[1:]):
            if previous.out_channels != block.in_channels:
                raise WeightsFileError(f"block {block.index} does not follow block {previous.index}")
        self.blocks = [_MBConv(spec, weights, compute_dtype) for spec in blocks]
        kernel, bias = _fold_bn(weights, "_conv_head", "_bn1", (feature_dim, blocks[-1].out_channels, 1, 1))
        self.head = _Conv(
            kernel, bias, 1, depthwise=False, relu6=True, name="head", compute_dtype=compute_dtype
        )
        self.fc_kernel = tf.Variable(
            weights.take("_fc.weight", (num_classes, feature_dim)).T.copy(), name="fc_kernel"
        )
        self.fc_bias = tf.Variable(weights.take("_fc.bias", (num_classes,)), name="fc_bias")
        weights.check_all_used()

    def features(self, images: tf.Tensor) -> tf.Tensor:
        """[batch, h, w, 3] images -> [batch, feature_dim] globally pooled features."""
        # Both constants are exact in bfloat16.
        x = tf.cast(images, self._dtype) * tf.constant(INPUT_SCALE, self._dtype) + tf.constant(
            INPUT_OFFSET, self._dtype
        )
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return tf.reduce_mean(tf.cast(self.head(x), tf.float32), axis=[1, 2])

    def logits(self, images: tf.Tensor) -> tf.Tensor:
        """[batch, h, w, 3] images -> [batch, num_classes] ImageNet logits."""
        return tf.nn.bias_add(tf.matmul(self.features(images), self.fc_kernel), self.fc_bias)


def hub_module(net: EfficientNetLite) -> tf.train.Checkpoint:
    """Wrap `net` as a TF Hub reusable SavedModel root object.

    hub.load(path)(images) and hub.KerasLayer call ``__call__``; KerasLayer finds
    the weights in ``variables`` / ``trainable_variables``.  Those must be plain
    attributes: tf.Module computes them as properties, which SavedModel drops.
    """
    images = tf.TensorSpec([None, None, None, 3], tf.float32, name="images")
    root = tf.train.Checkpoint(net=net)
    root.__call__ = tf.function(net.features, input_signature=[images])
    root.logits = tf.function(net.logits, input_signature=[images])
    root.variables = list(net.variables)
    root.trainable_variables = list(net.trainable_variables)
    root.regularization_losses = []
    return root


def _signatures(net: EfficientNetLite) -> dict[str, tf.types.experimental.ConcreteFunction]:
    """'serving_default' -> {'default': features}, 'logits' -> {'logits': logits}."""
    images = tf.TensorSpec([None, None, None, 3], tf.float32, name="images")

    @tf.function(input_signature=[images])
    def serving_default(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"default": net.features(images)}

    @tf.function(input_signature=[images])
    def logits(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"logits": net.logits(images)}

    return {
        "serving_default": serving_default.get_concrete_function(),
        "logits": logits.get_concrete_function(),
    }


def export_saved_model(
    state: dict[str, np.ndarray], path: str, *, feature_dim: int, num_classes: int, precision: str = "float32"
) -> None:
    """Write EfficientNet-Lite built from `state` as a TF Hub SavedModel at `path`."""
    net = EfficientNetLite(
        state, feature_dim=feature_dim, num_classes=num_classes, compute_dtype=tf.as_dtype(precision)
    )
    tf.saved_model.save(hub_module(net), path, signatures=_signatures(net))
