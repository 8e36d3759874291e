/**
 * A change signal without timers: `ticket()` returns an effect that completes at the next `notify()`. Take the
 * ticket before checking the condition you wait for, then wait on it, so no change slips between the check and the
 * wait. Single-threaded JavaScript makes the take-check-wait sequence safe without locks.
 */
import { Deferred, Effect } from "effect"

export interface ChangeSignal {
  readonly notify: () => void
  readonly ticket: () => Effect.Effect<void>
}

export const make = (): ChangeSignal => {
  let current = Deferred.makeUnsafe<void>()
  return {
    notify: () => {
      const done = current
      current = Deferred.makeUnsafe<void>()
      Deferred.doneUnsafe(done, Effect.void)
    },
    ticket: () => Deferred.await(current)
  }
}
