/**
 * Admin auth, per the contract: with a token configured, a bearer token is
 * required (compared in constant time); without one, only loopback peers get
 * in, so a fresh server exposes nothing to the network. The peer address is
 * the socket's, never X-Forwarded-For, which any client can write.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import { isIPv4, isIPv6 } from 'node:net';
import type { Request, RequestHandler } from 'express';
import { ServeError } from '../errors.js';

export type RemoteAddress = (req: Request) => string | undefined;

export const socketAddress: RemoteAddress = (req) => req.socket.remoteAddress;

export function isLoopback(address: string | undefined): boolean {
  if (!address) return false;
  const v4 = address.toLowerCase().startsWith('::ffff:') ? address.slice(7) : address;
  if (isIPv4(v4)) return v4.split('.')[0] === '127';
  return isIPv6(address) && /^(0{0,4}:){7}0{0,3}1$|^::1$/.test(address.toLowerCase());
}

/** Hashing first gives equal lengths, which timingSafeEqual needs, without leaking the token's length. */
const digest = (s: string) => createHash('sha256').update(s).digest();

export function adminAuth(token: string | null, remoteAddress: RemoteAddress = socketAddress): RequestHandler {
  const expected = token === null ? null : digest(token);
  return (req, _res, next) => {
    if (expected === null) {
      if (isLoopback(remoteAddress(req))) return next();
      throw new ServeError(403, 'forbidden',
        'admin endpoints answer only loopback addresses when DELTASERVE_ADMIN_TOKEN is unset; set it and send "Authorization: Bearer <token>"');
    }
    const header = req.headers.authorization;
    const match = header ? /^Bearer\s+(\S+)\s*$/i.exec(header) : null;
    if (!match) throw new ServeError(401, 'unauthorized', 'admin endpoints need "Authorization: Bearer <DELTASERVE_ADMIN_TOKEN>"');
    if (!timingSafeEqual(digest(match[1]), expected)) throw new ServeError(403, 'forbidden', 'the bearer token is not the admin token');
    next();
  };
}
