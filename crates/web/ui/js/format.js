// Numbers for people.

export function bytes(n) {
  if (n === null || n === undefined) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = Number(n);
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return `${v >= 100 || i === 0 ? v.toFixed(0) : v.toFixed(1)} ${units[i]}`;
}

export const rate = (bps) => (bps ? `${bytes(bps)}/s` : '–');
export const mib = (n) => (n >= 1024 ? `${(n / 1024).toFixed(n % 1024 ? 1 : 0)} GiB` : `${n} MiB`);

export function ms(n) {
  if (n === null || n === undefined) return '–';
  if (n < 1000) return `${n} ms`;
  if (n < 60_000) return `${(n / 1000).toFixed(1)} s`;
  return `${Math.floor(n / 60_000)} min ${Math.round((n % 60_000) / 1000)} s`;
}

export function clock(epochMs) {
  return new Date(epochMs).toLocaleTimeString([], { hour12: false });
}

export function ago(epochMs) {
  const s = Math.max(0, Math.round((Date.now() - epochMs) / 1000));
  return s < 60 ? `${s} s ago` : `${Math.round(s / 60)} min ago`;
}

/** A record of unknown shape (a disk, a NIC) in a few words: its name-like field, then
 *  its other short scalar fields. */
export function summary(x) {
  if (x === null || typeof x !== 'object') return String(x);
  const name = x.name ?? x.id ?? x.path ?? x.mac ?? '';
  const rest = Object.entries(x)
    .filter(([k, v]) => v !== null && v !== '' && typeof v !== 'object' && String(v) !== String(name))
    .map(([k, v]) => (k.endsWith('_mib') ? `${k.replace(/_mib$/, '')} ${mib(v)}` : k.endsWith('_bytes') ? `${k.replace(/_bytes$/, '')} ${bytes(v)}` : `${k} ${v}`))
    .slice(0, 3);
  return [name, ...rest].filter(Boolean).join(' · ');
}
