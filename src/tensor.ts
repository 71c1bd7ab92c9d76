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
  // These two are TypeScript `private`, not `#` fields: a `#` field in the shipped `.d.ts`
  // fails to type-check under tsc's default target.
  // A native tensor's shape never changes (`assign` keeps it), so it is read across N-API
  // once: every optimizer step checks each leaf's shape.
  private cachedShape: number[] | undefined
  // Set by `dispose`, so that a step's check of each leaf needs no N-API call.
  private disposeCalled = false

  /**
   * @internal Wraps a native tensor; use {@link Tensor.fromArray}. A caller that knows the
   * shape passes it, which saves reading it across N-API.
   */
  constructor(handle: NativeTensor, shape?: readonly number[]) {
    this.native = handle
    if (shape !== undefined) this.cachedShape = [...shape]
  }

  /**
   * A tensor from row-major values and a shape (`[]` for a scalar).
   * @throws RangeError when the number of values does not match the shape.
   */
  static fromArray(data: Float32Array | ArrayLike<number>, shape: readonly number[], options: TensorOptions = {}): Tensor {
    if (!Array.isArray(shape) || shape.some((d) => !Number.isInteger(d) || d < 0)) {
      throw new TypeError(`Tensor.fromArray: shape must be an array of non-negative integers, got ${JSON.stringify(shape)}`)
    }
    const values = data instanceof Float32Array ? data : Float32Array.from(data)
    return new Tensor(
      call(() => native.NativeTensor.fromArray(values, [...shape], options.dtype ?? 'float32', options.device ?? 'cpu'), 'Tensor.fromArray'),
      shape,
    )
  }

  /** The shape. */
  get shape(): number[] {
    return [...this.shapeView()]
  }

  /** @internal The cached shape itself, not a copy: callers must not modify it. */
  shapeView(): readonly number[] {
    this.cachedShape ??= call(() => this.native.shape, 'Tensor.shape')
    return this.cachedShape
  }

  /** The element type. */
  get dtype(): DType {
    return call(() => this.native.dtype, 'Tensor.dtype') as DType
  }

  /** The device, e.g. `'cpu'` or `'cuda:0'`. */
  get device(): DeviceName {
    return call(() => this.native.device, 'Tensor.device')
  }

  /** Whether {@link Tensor.dispose} was called. */
  get disposed(): boolean {
    return this.disposeCalled || this.native.disposed
  }

  /**
   * @internal Whether {@link Tensor.dispose} was called on this object: {@link
   * Tensor.disposed} without the N-API call, blind only to a native handle disposed directly.
   */
  get disposedHere(): boolean {
    return this.disposeCalled
  }

  /**
   * Frees the native memory now; any later use of this tensor throws a `TypeError`.
   * Idempotent. Without it the memory goes back when the garbage collector has collected
   * this object and the event loop has then turned (N-API runs finalizers there), so a
   * long synchronous loop that drops large tensors (the updates of `update`, the results
   * of `applyUpdates`) should dispose them; `PsgdOptimizer.step` does so for its own.
   */
  dispose(): void {
    this.disposeCalled = true
    this.native.dispose()
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

/**
 * Bytes held by native tensors whose JS objects are alive or not yet finalized (disposed
 * ones excluded): a way to see whether a loop frees what it drops. See {@link Tensor.dispose}.
 */
export function liveTensorBytes(): number {
  return native.liveTensorBytes()
}
