/**
 * A program that cannot stop: its work is uninterruptible and never ends, and its shutdown bound is 1 s. It prints
 * `ready` on stderr once its bound is set. For the test that the bound holds whatever the program does.
 */
import { Duration, Effect } from "effect"
import { boundShutdown, run } from "../../src/programs/main.ts"

run(
  boundShutdown(Duration.seconds(1)).pipe(
    Effect.andThen(Effect.sync(() => process.stderr.write("ready\n"))),
    Effect.andThen(Effect.uninterruptible(Effect.never))
  )
)
