/**
 * Small helpers for tests that talk to a program's HTTP endpoint (`/readyz`, `/metrics`).
 */
import * as Net from "node:net"
import { type Duration, Effect, Schedule } from "effect"

/** A loopback port nobody listens on (the OS's pick, released again). */
export const freePort = Effect.promise(
  () =>
    new Promise<number>((resolve) => {
      const server = Net.createServer()
      server.listen(0, "127.0.0.1", () => {
        const address = server.address()
        server.close(() => resolve(typeof address === "object" && address !== null ? address.port : 0))
      })
    })
)

/** GET `url`: its status and body. */
export const get = (url: string) =>
  Effect.tryPromise(async () => {
    const response = await fetch(url)
    return { status: response.status, body: await response.text() }
  })

/** Polls `effect` every 200 ms (failures included) until `until` holds, failing after `timeout`. */
export const eventually = <A, E, R>(
  effect: Effect.Effect<A, E, R>,
  until: (a: A) => boolean,
  what: string,
  timeout: Duration.Input = "60 seconds"
) =>
  effect.pipe(
    Effect.retry(Schedule.spaced("200 millis")),
    Effect.repeat({ schedule: Schedule.spaced("200 millis"), until }),
    Effect.timeoutOrElse({
      duration: timeout,
      orElse: () => Effect.die(new Error(`timed out waiting for ${what}`))
    })
  )
