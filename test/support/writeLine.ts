import * as Fs from "node:fs"

/**
 * Writes a line to stdout before returning. process.stdout on a pipe is asynchronous on POSIX: lines it still
 * buffered when the process is SIGKILLed would be lost although what they report happened. fd 1 is left blocking
 * (process.stdout is never opened); EAGAIN, should it be non-blocking after all, is waited out.
 */
export const writeLine = (line: string) => {
  const bytes = Buffer.from(`${line}\n`)
  let written = 0
  while (written < bytes.length) {
    try {
      written += Fs.writeSync(1, bytes, written)
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "EAGAIN") throw error
    }
  }
}
