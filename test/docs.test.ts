/**
 * The docs cannot drift from the code: the configuration tables list exactly the variables `KafkaConfig` reads, and
 * every TypeScript block of the README is an excerpt of an example that `npm run check` compiles and the suite runs.
 */
import * as Fs from "node:fs"
import * as Path from "node:path"
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import * as KafkaConfig from "../src/KafkaConfig.ts"

const root = Path.join(import.meta.dirname, "..")
const read = (file: string) => Fs.readFileSync(Path.join(root, file), "utf8")

/** The variables named in the first column of a Markdown table's rows (`| \`NAME\`, \`NAME\` | …`). */
const tableVariables = (markdown: string) =>
  new Set(
    markdown
      .split("\n")
      .filter((line) => /^\| `[A-Z_]+`/.test(line))
      .flatMap((line) => [...(line.split("|")[1] ?? "").matchAll(/`([A-Z_]+)`/g)].map((match) => match[1] as string))
  )

describe("the docs", () => {
  for (const file of ["README.md", "docs/configuration.md"]) {
    it.effect(`${file}: its configuration table lists exactly the variables KafkaConfig reads`, () =>
      Effect.sync(() => {
        assert.sameMembers([...tableVariables(read(file))], [...KafkaConfig.variables])
      })
    )
  }

  it.effect("every TypeScript block of the README is an excerpt of a file in examples/", () =>
    Effect.sync(() => {
      const examples = Fs.readdirSync(Path.join(root, "examples"))
        .filter((name) => name.endsWith(".ts"))
        .map((name) => read(Path.join("examples", name)))
      const blocks = [...read("README.md").matchAll(/```ts\n([\s\S]*?)```/g)].map((match) => match[1] as string)
      assert.isAbove(blocks.length, 0)
      for (const block of blocks) {
        assert.isTrue(
          examples.some((example) => example.includes(block.trimEnd())),
          `not in examples/: ${block.slice(0, 200)}`
        )
      }
    })
  )

  it.effect("every local link of the README and docs/ points to a file that exists", () =>
    Effect.sync(() => {
      for (const file of ["README.md", ...Fs.readdirSync(Path.join(root, "docs")).map((name) => `docs/${name}`)]) {
        for (const [, target] of read(file).matchAll(/\]\(([^)#:]+)(#[^)]*)?\)/g)) {
          const resolved = Path.join(root, Path.dirname(file), target as string)
          assert.isTrue(Fs.existsSync(resolved), `${file} links to ${target}`)
        }
      }
    })
  )
})
