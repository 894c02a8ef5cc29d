/**
 * Test-only fault hooks (DELTASERVE_FAULTS, never set by default): real parts
 * made to fail on purpose, so the reliability suite can check that exactly
 * what should fail does. The HTTP routes that arm them: src/http/routes/faults.ts.
 */
export const FAULTS = ['engine-step'] as const;
export type Fault = (typeof FAULTS)[number];
