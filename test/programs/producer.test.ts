/** The producer program's parts: its line reader (strict UTF-8, whatever the chunks' boundaries) and its pacing. */
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import { dueInTick, lines } from "../../src/programs/producer.ts"

const read = (chunks: ReadonlyArray<ReadonlyArray<number> | string>) =>
  Effect.promise(async () => {
    async function* input() {
      for (const chunk of chunks) yield typeof chunk === "string" ? Buffer.from(chunk) : Uint8Array.from(chunk)
    }
    const out: Array<unknown> = []
    for await (const line of lines(input())) out.push(line)
    return out
  })

describe("producer program: lines", () => {
  it.effect("\\n and \\r\\n end lines; a last line without an end counts; blank lines keep their numbers", () =>
    Effect.gen(function* () {
      assert.deepStrictEqual(yield* read(["a\r\nb", "\n\nc"]), [
        { number: 1, text: "a" },
        { number: 2, text: "b" },
        { number: 3, text: "" },
        { number: 4, text: "c" }
      ])
    })
  )

  it.effect("a character split across chunks is whole; a byte-order mark is dropped", () =>
    Effect.gen(function* () {
      const e = [...Buffer.from("é")]
      assert.deepStrictEqual(
        yield* read([
          [0xef, 0xbb, 0xbf, 0x63, 0x61, 0x66, e[0] ?? 0],
          [e[1] ?? 0, 10]
        ]),
        [{ number: 1, text: "café" }]
      )
    })
  )

  it.effect("a line that is not UTF-8 is reported, not sent with replacement characters", () =>
    Effect.gen(function* () {
      // "caf\xe9": Latin-1, which readline would have read as "caf\ufffd".
      assert.deepStrictEqual(yield* read([[0x63, 0x61, 0x66, 0xe9, 10], "ok\n"]), [
        { number: 1, invalid: "not valid UTF-8" },
        { number: 2, text: "ok" }
      ])
    })
  )
})

describe("producer program: --rate", () => {
  it("sends exactly `rate` events in every second of ticks, spread over them", () => {
    for (const rate of [1, 3, 10, 14, 15, 25, 999, 1000]) {
      for (let second = 0; second < 3; second++) {
        const ticks = Array.from({ length: 10 }, (_, i) => dueInTick(rate, second * 10 + i))
        assert.strictEqual(
          ticks.reduce((a, b) => a + b, 0),
          rate,
          `rate ${rate}, second ${second}: ${ticks}`
        )
        assert.isAtMost(Math.max(...ticks) - Math.min(...ticks), 1, `rate ${rate} spread evenly: ${ticks}`)
      }
    }
  })
})
