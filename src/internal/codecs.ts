/**
 * Kafka's compression codecs, as the engines need them: `compress` and `decompress` of a record batch's records.
 *
 * - gzip and zstd: Node's own `zlib` (zstd since Node 22.15).
 * - snappy: `snappy` (napi-rs, prebuilt binaries from the npm registry). Java's producer writes snappy in xerial's
 *   framing (a magic header, then length-prefixed blocks); librdkafka and Go clients write a plain snappy block.
 *   Both are read; we write xerial's framing, which every client reads.
 * - lz4: `lz4-napi` (napi-rs over lz4_flex, prebuilt binaries from the npm registry). Kafka's lz4 (record batch
 *   magic 2) is the standard LZ4 frame format, with independent blocks.
 *
 * The native packages are loaded on first use: a process that never meets a snappy or lz4 batch never loads them.
 * A batch that cannot be decompressed fails with `CodecError`, which says which codec and why.
 */
import { promisify } from "node:util"
import * as Zlib from "node:zlib"
import type { Compression } from "../KafkaConfig.ts"

export interface Codec {
  readonly compress: (data: Buffer) => Promise<Buffer>
  readonly decompress: (data: Buffer) => Promise<Buffer>
}

/**
 * A batch that its codec could not decompress (corrupt data), or a codec that could not be loaded; with the batch's
 * offsets when they could be read (`batchOffsets`).
 */
export class CodecError extends Error {
  override readonly name = "CodecError"
  readonly codec: string
  readonly detail: string
  readonly offsets: { readonly first: bigint; readonly last: bigint } | undefined
  constructor(codec: string, detail: string, offsets?: { readonly first: bigint; readonly last: bigint }) {
    super(`${codec} batch could not be decompressed: ${detail}`)
    this.codec = codec
    this.detail = detail
    this.offsets = offsets
  }
}

const codecIds: Readonly<Record<Compression, number>> = { none: 0, gzip: 1, snappy: 2, lz4: 3, zstd: 4 }

/** The bytes of a record batch (magic 2) before its records: base offset to record count. */
const batchHeaderLength = 61

/**
 * The offsets of the record batch whose records `compressed` holds, read from the batch header just before them,
 * when `compressed` is a view into the fetch response (as the engines decode it) and that header checks out (magic 2,
 * this codec); else undefined. Only for the error message: the records themselves are gone.
 */
export const batchOffsets = (compressed: Uint8Array, codec: Compression | number) => {
  if (compressed.byteOffset < batchHeaderLength) return undefined
  const header = Buffer.from(compressed.buffer, compressed.byteOffset - batchHeaderLength, batchHeaderLength)
  const id = typeof codec === "number" ? codec : codecIds[codec]
  if (header.readInt8(16) !== 2 || (header.readInt16BE(21) & 0x07) !== id) return undefined
  const first = header.readBigInt64BE(0)
  return { first, last: first + BigInt(header.readInt32BE(23)) }
}

/** A batch whose attributes name a codec Kafka does not have (5–7): its data cannot be read. */
export const unknownCodec = (id: number, data: Buffer) =>
  new CodecError(`codec ${id}`, "Kafka has no such codec (the batch's attributes are corrupt)", batchOffsets(data, id))

const failed = (codec: Compression, data?: Buffer) => (cause: unknown) => {
  if (cause instanceof CodecUnavailable) throw cause
  const offsets = data === undefined ? undefined : batchOffsets(data, codec)
  throw new CodecError(codec, cause instanceof Error ? cause.message : String(cause), offsets)
}

const gzip = promisify(Zlib.gzip)
const unzip = promisify(Zlib.unzip)
const zstdCompress = promisify(Zlib.zstdCompress)
const zstdDecompress = promisify(Zlib.zstdDecompress)

const once = <A>(load: () => Promise<A>) => {
  let loaded: Promise<A> | undefined
  return () => {
    loaded ??= load()
    return loaded
  }
}
/**
 * A codec's native package that cannot load on this platform (no prebuilt binary for it): not the batch's fault,
 * and not something to go past by skipping records.
 */
export class CodecUnavailable extends Error {
  override readonly name = "CodecUnavailable"
  readonly codec: string
  constructor(codec: string, cause: unknown) {
    super(
      `the ${codec} codec cannot be loaded on this platform: ${cause instanceof Error ? cause.message : String(cause)}`
    )
    this.codec = codec
  }
}

const load = <A>(codec: string, module: () => Promise<A>) =>
  once(() =>
    module().catch((cause: unknown) => {
      throw new CodecUnavailable(codec, cause)
    })
  )
const snappyModule = load("snappy", () => import("snappy"))
const lz4Module = load("lz4", () => import("lz4-napi"))

/** xerial's snappy framing: this magic, a version and a compatible version (int32 each), then blocks. */
const xerialMagic = Buffer.from([0x82, 0x53, 0x4e, 0x41, 0x50, 0x50, 0x59, 0x00])
const xerialHeaderLength = 16
/** The uncompressed size of a block we write, as Java's snappy-java (32 KiB). */
const xerialBlockSize = 32 * 1024

const isXerial = (data: Buffer) =>
  data.length >= xerialHeaderLength && data.subarray(0, xerialMagic.length).equals(xerialMagic)

const snappyDecompress = async (data: Buffer): Promise<Buffer> => {
  const snappy = await snappyModule()
  const block = async (bytes: Buffer) => {
    const out = await snappy.uncompress(bytes)
    return typeof out === "string" ? Buffer.from(out) : out
  }
  if (!isXerial(data)) return block(data)
  const blocks: Array<Buffer> = []
  let at = xerialHeaderLength
  while (at < data.length) {
    if (at + 4 > data.length) throw new Error(`truncated xerial block header at byte ${at}`)
    const length = data.readInt32BE(at)
    at += 4
    if (length < 0 || at + length > data.length) throw new Error(`xerial block of ${length} bytes past the end`)
    blocks.push(await block(data.subarray(at, at + length)))
    at += length
  }
  return Buffer.concat(blocks)
}

const snappyCompress = async (data: Buffer): Promise<Buffer> => {
  const snappy = await snappyModule()
  const header = Buffer.alloc(xerialHeaderLength)
  xerialMagic.copy(header)
  header.writeInt32BE(1, 8)
  header.writeInt32BE(1, 12)
  const parts: Array<Buffer> = [header]
  const blocks = Math.max(1, Math.ceil(data.length / xerialBlockSize))
  for (let index = 0; index < blocks; index++) {
    const block = await snappy.compress(data.subarray(index * xerialBlockSize, (index + 1) * xerialBlockSize))
    const length = Buffer.alloc(4)
    length.writeInt32BE(block.length)
    parts.push(length, block)
  }
  return Buffer.concat(parts)
}

export const codecs: Readonly<Record<Exclude<Compression, "none">, Codec>> = {
  gzip: {
    compress: (data) => gzip(data),
    decompress: (data) => unzip(data).catch(failed("gzip", data))
  },
  snappy: {
    compress: snappyCompress,
    decompress: (data) => snappyDecompress(data).catch(failed("snappy", data))
  },
  lz4: {
    compress: async (data) => (await lz4Module()).compressFrame(data),
    decompress: async (data) => {
      const lz4 = await lz4Module()
      return lz4.decompressFrame(data).catch(failed("lz4", data))
    }
  },
  zstd: {
    compress: (data) => zstdCompress(data),
    decompress: (data) => zstdDecompress(data).catch(failed("zstd", data))
  }
}
