import { call, native, type NativeTensor } from './native'

/** Element types a {@link Tensor} can hold. */
export type DType = 'float32' | 'bfloat16' | 'float16' | 'float64'

/** Where a {@link Tensor} lives: `'cpu'`, `'cuda'`, `'cuda:N'` or `'metal'`. */
export type DeviceName = string

/** Options of {@link Tensor.fromArray}. */
export interface TensorOptions {
  /** Device to place the tensor on; default `'cpu'`. */
  device?: DeviceName
  /** Element type; default `'float32'`. */
  dtype?: DType
}

/**
 * A tensor in native memory (CPU, or GPU with a CUDA/Metal build), backed by candle.
 * Optimizer state for Tensor leaves stays on the same device.
 */
export class Tensor {
  /** @internal */
  native: NativeTensor

  /** @internal Wraps a native tensor; use {@link Tensor.fromArray}. */
  constructor(handle: NativeTensor) {
    this.native = handle
  }

  /**
   * A tensor from row-major values and a shape (`[]` for a scalar).
   * @throws RangeError when the number of values does not match the shape.
   */
  static fromArray(
    data: Float32Array | ArrayLike<number>,
    shape: readonly number[],
    options: TensorOptions = {},
  ): Tensor {
    if (!Array.isArray(shape) || shape.some((d) => !Number.isInteger(d) || d < 0)) {
      throw new TypeError(`Tensor.fromArray: shape must be an array of non-negative integers, got ${JSON.stringify(shape)}`)
    }
    const values = data instanceof Float32Array ? data : Float32Array.from(data)
    return new Tensor(
      call(
        () =>
          native.NativeTensor.fromArray(values, [...shape], options.dtype ?? 'float32', options.device ?? 'cpu'),
        'Tensor.fromArray',
      ),
    )
  }

  /** The shape. */
  get shape(): number[] {
    return this.native.shape
  }

  /** The element type. */
  get dtype(): DType {
    return this.native.dtype as DType
  }

  /** The device, e.g. `'cpu'` or `'cuda:0'`. */
  get device(): DeviceName {
    return this.native.device
  }

  /** The values as float32, row-major (copied to JS memory). */
  toArray(): Float32Array {
    return call(() => this.native.toArray())
  }

  /** A copy with another dtype and/or device. */
  to(options: TensorOptions): Tensor {
    return new Tensor(call(() => this.native.to(options.dtype ?? this.dtype, options.device ?? this.device)))
  }
}
