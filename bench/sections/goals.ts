/** How goal tables say met / not met. */
export const yes = (ok: boolean) => (ok ? 'yes' : '**no**');
