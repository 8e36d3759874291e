/** Printing failures in logs without failing again. */
import { Cause } from "effect"

/**
 * `Cause.pretty`, or a placeholder when the failure cannot be printed: an error whose `message` or `stack` getter
 * throws (or a Proxy) makes `Cause.pretty` throw, and a log line must never become a defect of its own.
 */
export const prettyCause = (cause: Cause.Cause<unknown>): string => {
  try {
    return Cause.pretty(cause)
  } catch (error) {
    return `(the failure could not be printed: ${error instanceof Error ? error.message : "unknown"})`
  }
}
