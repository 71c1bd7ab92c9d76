import { preview, showShape } from './describe'
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
  // These are TypeScript `private`, not `#` fields: a `#` field in the shipped `.d.ts` fails
  // to type-check under tsc's default target.
  // A native tensor's shape never changes (`assign` keeps it), so it is read across N-API
  // once: every optimizer step checks each leaf's shape.
  private cachedShape: number[] | undefined
  // Set by `dispose`, so that a step's check of each leaf needs no N-API call.
  private disposeCalled = false
  // How many pending async steps read this tensor: `dispose` is refused meanwhile, since
  // the step would otherwise fail after its work (or write into a freed tensor).
  private uses = 0

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
   * @throws TypeError when a value is not a number or the shape is not an array of
   * non-negative integers; RangeError when the number of values does not match the shape,
   * a dim exceeds 2^32 − 1, or a finite value overflows float32 (it would become Infinity).
   */
  static fromArray(data: Float32Array | ArrayLike<number>, shape: readonly number[], options: TensorOptions = {}): Tensor {
    checkShape(shape, 'Tensor.fromArray')
    const values = data instanceof Float32Array ? data : toFloat32(data)
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
   * Idempotent. Without it the memory goes back when the garbage collector collects this
   * object: each tensor reports its bytes to V8, so the collector runs in time even in a
   * long synchronous loop (tested), but `dispose` frees at once, which keeps the peak
   * lower when tensors are large; `PsgdOptimizer.step` disposes its own temporaries.
   * @throws TypeError while a pending `stepAsync`/`updateAsync` reads this tensor (it stays
   * usable; dispose it once the step has settled).
   */
  dispose(): void {
    if (this.uses > 0) {
      throw new TypeError('Tensor.dispose: the tensor is in use by a pending stepAsync/updateAsync; await it first (the tensor stays usable)')
    }
    this.disposeCalled = true
    this.native.dispose()
  }

  /** @internal Marks the tensor as read by a pending async step (`dispose` is refused). */
  retain(): void {
    this.uses++
  }

  /** @internal Ends a {@link Tensor.retain}. */
  unretain(): void {
    this.uses--
  }

  /**
   * The values as float32, row-major, copied to JS memory: into `into` when given (which
   * must have exactly as many elements; nothing is allocated, so a loop that syncs weights
   * every step can reuse one buffer), else into a new array.
   * @throws TypeError when `into` is not a Float32Array; RangeError when its length differs
   * from the element count.
   */
  toArray(into?: Float32Array): Float32Array {
    if (into === undefined) return readValues(this.native, this.shapeView())
    if (!(into instanceof Float32Array)) throw new TypeError(`Tensor.toArray: into must be a Float32Array, got ${preview(into)}`)
    const n = elementCount(this.shapeView())
    if (into.length !== n) throw new RangeError(`Tensor.toArray: the tensor has ${n} values, into has ${into.length}`)
    call(() => this.native.copyTo(into), 'Tensor.toArray')
    return into
  }

  /**
   * Copies `values` (row-major, as many as the tensor has) into this tensor, in place: its
   * identity, shape, dtype and device stay, so an optimizer holding it sees the new values.
   * @throws TypeError when `values` is not a Float32Array, the tensor was disposed or a
   * pending `stepAsync`/`updateAsync` reads it; RangeError when the number of values differs from the element count.
   */
  set(values: Float32Array): void {
    if (!(values instanceof Float32Array)) {
      throw new TypeError(`Tensor.set: values must be a Float32Array, got ${preview(values)}: convert them with Float32Array.from(values)`)
    }
    if (this.disposed) throw new TypeError('Tensor.set: the tensor was disposed')
    // a pending async step reads these values on another thread
    if (this.uses > 0) throw new TypeError('Tensor.set: the tensor is in use by a pending stepAsync/updateAsync; await it first')
    const shape = this.shapeView()
    const n = elementCount(shape)
    if (values.length !== n) throw new RangeError(`Tensor.set: the tensor has ${n} values, got ${values.length}`)
    // a native copy on the tensor's own device and dtype, moved in by `assign`, then freed
    // at once (not left for a finalizer after the event loop turns)
    const src = call(() => native.NativeTensor.fromArray(values, [...shape], this.dtype, this.device), 'Tensor.set')
    try {
      call(() => this.native.assign(src), 'Tensor.set')
    } finally {
      src.dispose()
    }
  }

  /** A copy with another dtype and/or device. */
  to(options: TensorOptions): Tensor {
    return new Tensor(call(() => this.native.to(options.dtype ?? this.dtype, options.device ?? this.device)))
  }
}

/**
 * @internal A native tensor's values, copied into a Float32Array allocated here: one the
 * addon made would be freed only by a finalizer after the event loop turns (see `copyTo`).
 */
export function readValues(t: NativeTensor, shape: readonly number[]): Float32Array {
  const out = new Float32Array(elementCount(shape))
  call(() => t.copyTo(out))
  return out
}

function elementCount(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1)
}

/** The largest dim the native side takes (it reads dims as unsigned 32-bit integers). */
const MAX_DIM = 0xffffffff

/**
 * Checks a shape as the native side will read it: integer dims in u32 range, and an
 * element count that is exact in a double (so a count check against the data is exact).
 * @internal
 */
export function checkShape(shape: unknown, context: string): asserts shape is number[] {
  if (!Array.isArray(shape) || shape.some((d) => !Number.isInteger(d) || d < 0)) {
    const fix = ArrayBuffer.isView(shape) ? ': convert it with Array.from(shape)' : ''
    throw new TypeError(`${context}: shape must be an array of non-negative integers, got ${showShape(shape)}${fix}`)
  }
  const big = (shape as number[]).find((d) => d > MAX_DIM)
  if (big !== undefined) throw new RangeError(`${context}: shape ${showShape(shape)} has dim ${big}, more than 2^32 - 1`)
  if (!shape.includes(0) && !Number.isSafeInteger((shape as number[]).reduce((a, b) => a * b, 1))) {
    throw new RangeError(`${context}: shape ${showShape(shape)} has more elements than 2^53 - 1`)
  }
}

/** Values as float32, refusing what float32 cannot hold instead of making NaN or ±Infinity. */
function toFloat32(data: ArrayLike<number>): Float32Array {
  if (data === null || typeof data !== 'object' || typeof data.length !== 'number') {
    // a typed array through JSON.stringify/JSON.parse becomes { "0": …, "1": … }
    const fix = data !== null && typeof data === 'object' && '0' in data ? ': if it came through JSON, use Object.values(data)' : ''
    throw new TypeError(`Tensor.fromArray: data must be a Float32Array or an array of numbers, got ${preview(data)}${fix}`)
  }
  const out = new Float32Array(data.length)
  for (let i = 0; i < data.length; i++) {
    const v = data[i]
    if (typeof v !== 'number') {
      const fix = typeof v === 'bigint' ? ': convert with Float32Array.from(data, Number)' : ''
      throw new TypeError(`Tensor.fromArray: data[${i}] is not a number (${preview(v)})${fix}`)
    }
    const f = Math.fround(v)
    if (Number.isFinite(v) && !Number.isFinite(f)) throw new RangeError(`Tensor.fromArray: data[${i}] = ${v} overflows float32`)
    out[i] = f
  }
  return out
}

/**
 * Bytes held by native tensors whose JS objects are alive or not yet finalized (disposed
 * ones excluded): a way to see whether a loop frees what it drops. See {@link Tensor.dispose}.
 */
export function liveTensorBytes(): number {
  return native.liveTensorBytes()
}
