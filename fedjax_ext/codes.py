"""Binary BCH codes and FedUV's secret codewords.

FedUV (Hosseini et al., ICML 2021, "Federated Learning of User Verification
Models Without Sharing Embeddings") gives every user a secret codeword of an
error-correcting code: because any two codewords differ in at least d_min of
their n bits, training each user's embedding towards its own codeword alone
(a positive-only loss) also keeps it away from every other user's. The
server hands out unique ids; a user's message is its id's bits followed by
private random bits, so codewords are distinct while the server, knowing
only the id, cannot tell which codeword a user holds.

The codes here are narrow-sense primitive binary BCH codes (Bose &
Ray-Chaudhuri 1960; Hocquenghem 1959), length n = 2^m - 1: the generator
polynomial is the least common multiple of the minimal polynomials of
alpha^1 .. alpha^(2t) over GF(2), alpha a primitive element of GF(2^m), so
the code corrects t errors and its minimum distance is at least the designed
distance 2t + 1 (the BCH bound). Encoding is systematic.

Polynomials over GF(2) are Python ints, bit i being the coefficient of x^i;
elements of GF(2^m) are ints in [0, 2^m).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

# x^m + ... as an int with bit m set: a primitive polynomial of each degree.
PRIMITIVE_POLYNOMIALS = {
    2: 0b111, 3: 0b1011, 4: 0b10011, 5: 0b100101, 6: 0b1000011,
    7: 0b10001001, 8: 0b100011101, 9: 0b1000010001, 10: 0b10000001001,
}


@dataclasses.dataclass(frozen=True)
class GaloisField:
  """GF(2^m) by exp / log tables of a primitive element alpha."""
  m: int
  exp: np.ndarray  # exp[i] = alpha^i, for i in [0, 2 * (2^m - 1)).
  log: np.ndarray  # log[alpha^i] = i; log[0] unused.

  @property
  def order(self) -> int:
    """n = 2^m - 1, the multiplicative order of alpha."""
    return (1 << self.m) - 1

  def mul(self, a: int, b: int) -> int:
    if a == 0 or b == 0:
      return 0
    return int(self.exp[self.log[a] + self.log[b]])

  def power(self, i: int) -> int:
    """alpha^i for any integer i."""
    return int(self.exp[i % self.order])


def galois_field(m: int) -> GaloisField:
  """Builds GF(2^m) from `PRIMITIVE_POLYNOMIALS[m]`."""
  if m not in PRIMITIVE_POLYNOMIALS:
    raise ValueError(f'GF(2^m) needs m in {sorted(PRIMITIVE_POLYNOMIALS)}; '
                     f'got m={m}.')
  poly, n = PRIMITIVE_POLYNOMIALS[m], (1 << m) - 1
  exp = np.zeros(2 * n, np.int64)
  log = np.zeros(n + 1, np.int64)
  x = 1
  for i in range(n):
    exp[i] = exp[i + n] = x
    log[x] = i
    x <<= 1
    if x >> m:
      x ^= poly
  if len(set(exp[:n].tolist())) != n:
    raise AssertionError(f'Polynomial {poly:b} is not primitive.')
  return GaloisField(m=m, exp=exp, log=log)


def poly_degree(p: int) -> int:
  """Degree of a GF(2) polynomial (-1 for the zero polynomial)."""
  return p.bit_length() - 1


def poly_mul(a: int, b: int) -> int:
  """Product of two GF(2) polynomials (carry-less multiplication)."""
  out = 0
  while b:
    if b & 1:
      out ^= a
    a <<= 1
    b >>= 1
  return out


def poly_mod(a: int, b: int) -> int:
  """Remainder of a divided by b over GF(2)."""
  if b == 0:
    raise ZeroDivisionError('poly_mod by the zero polynomial.')
  db = poly_degree(b)
  while poly_degree(a) >= db:
    a ^= b << (poly_degree(a) - db)
  return a


def cyclotomic_coset(i: int, n: int) -> tuple[int, ...]:
  """{i * 2^j mod n}: the exponents of the conjugates of alpha^i."""
  coset, j = [], i % n
  while j not in coset:
    coset.append(j)
    j = (2 * j) % n
  return tuple(sorted(coset))


def minimal_polynomial(field: GaloisField, i: int) -> int:
  """The minimal polynomial of alpha^i over GF(2): prod (x + alpha^j)."""
  coeffs = [1]  # Over GF(2^m), low degree first.
  for j in cyclotomic_coset(i, field.order):
    root = field.power(j)
    shifted = [0] + coeffs                      # x * p(x)
    scaled = [field.mul(root, c) for c in coeffs] + [0]  # root * p(x)
    coeffs = [a ^ b for a, b in zip(shifted, scaled)]
  if any(c not in (0, 1) for c in coeffs):
    raise AssertionError(f'Minimal polynomial of alpha^{i} is not binary.')
  return sum(c << k for k, c in enumerate(coeffs))


@dataclasses.dataclass(frozen=True)
class BCHCode:
  """A binary narrow-sense primitive BCH code, encoded systematically.

  Attributes:
    m: field degree; n = 2^m - 1.
    t: designed number of correctable errors; designed distance 2t + 1.
    generator: g(x) as an int.
    generator_matrix: uint8 [k, n]; row i is the codeword of message e_i.
  """
  m: int
  t: int
  generator: int
  generator_matrix: np.ndarray

  @property
  def n(self) -> int:
    return (1 << self.m) - 1

  @property
  def k(self) -> int:
    return self.n - poly_degree(self.generator)

  @property
  def designed_distance(self) -> int:
    return 2 * self.t + 1

  def encode(self, messages: np.ndarray) -> np.ndarray:
    """Codewords uint8 [..., n] of message bits [..., k] (0/1)."""
    messages = np.asarray(messages)
    if messages.shape[-1:] != (self.k,):
      raise ValueError(f'BCH({self.n},{self.k}) encodes messages of {self.k} '
                       f'bits; got shape {messages.shape}.')
    if not np.isin(messages, (0, 1)).all():
      raise ValueError('Message bits must be 0 or 1.')
    return (messages.astype(np.int64) @ self.generator_matrix % 2).astype(
        np.uint8)


def bch_code(m: int, t: int) -> BCHCode:
  """BCH(n = 2^m - 1, k, t): g = lcm of the minimal polys of alpha^1..2t."""
  if not isinstance(t, int) or t < 1:
    raise ValueError(f'BCH t (errors corrected) must be an integer >= 1; '
                     f'got {t!r}.')
  field = galois_field(m)
  n = field.order
  generator, seen = 1, set()
  for i in range(1, 2 * t + 1):
    coset = cyclotomic_coset(i, n)
    if coset not in seen:  # Distinct minimal polys are coprime: lcm = product.
      seen.add(coset)
      generator = poly_mul(generator, minimal_polynomial(field, i))
  k = n - poly_degree(generator)
  if k < 1:
    raise ValueError(f'BCH with m={m}, t={t} has no message bits (deg g = '
                     f'{poly_degree(generator)} >= n = {n}); lower t.')
  parity = n - k
  rows = np.zeros((k, n), np.uint8)
  for i in range(k):
    shifted = 1 << (parity + i)  # x^(n-k) m(x) for m = x^i.
    word = shifted ^ poly_mod(shifted, generator)
    rows[i] = [(word >> b) & 1 for b in range(n)]
  return BCHCode(m=m, t=t, generator=generator, generator_matrix=rows)


def codeword_polynomial(bits: np.ndarray) -> int:
  """The polynomial sum_i bits[i] x^i of a codeword."""
  return sum(int(b) << i for i, b in enumerate(np.asarray(bits)))


def minimum_distance(code: BCHCode, max_messages: int = 1 << 20) -> int:
  """Exact minimum distance by enumerating every non-zero codeword.

  For a linear code it is the least weight of a non-zero codeword.
  """
  if (1 << code.k) - 1 > max_messages:
    raise ValueError(f'BCH({code.n},{code.k}) has 2^{code.k} codewords; '
                     f'brute force allows {max_messages}. Raise max_messages.')
  ids = np.arange(1, 1 << code.k)
  messages = (ids[:, None] >> np.arange(code.k)[None]) & 1
  return int(code.encode(messages).sum(axis=1).min())


def id_bits(num_users: int) -> int:
  """Bits of the message that hold a server-assigned id in [0, num_users)."""
  return max(1, math.ceil(math.log2(num_users)))


def user_codewords(code: BCHCode, user_ids, num_users: int, key: jax.Array,
                   min_random_bits: int = 1) -> np.ndarray:
  """FedUV codewords: message = [id bits, private random bits].

  Args:
    code: the BCH code.
    user_ids: server-assigned ids in [0, num_users), distinct.
    num_users: size of the id space the server assigns from.
    key: PRNG key; user u draws its private bits from `fold_in(key, u)`
      (on a real device: its own secret key).
    min_random_bits: fewest private bits a message may have.

  Returns:
    uint8 [len(user_ids), n] codewords. Distinct ids give distinct messages,
    hence codewords at Hamming distance >= d_min >= 2t + 1 from each other.

  Raises:
    ValueError: when ids repeat or fall outside [0, num_users), or the code
      has too few message bits for the ids plus `min_random_bits`.
  """
  user_ids = np.asarray(user_ids, np.int64).reshape(-1)
  if num_users < 1:
    raise ValueError(f'num_users must be >= 1; got {num_users}.')
  if user_ids.size and (user_ids.min() < 0 or user_ids.max() >= num_users):
    raise ValueError(f'user ids must lie in [0, {num_users}); got '
                     f'[{user_ids.min()}, {user_ids.max()}].')
  if len(np.unique(user_ids)) != len(user_ids):
    raise ValueError('user ids repeat; the server must assign unique ids.')
  b = id_bits(num_users)
  if code.k < b + min_random_bits:
    raise ValueError(
        f'BCH({code.n},{code.k}, t={code.t}) has {code.k} message bits, but '
        f'{num_users} users need {b} id bits plus {min_random_bits} private '
        'bits; choose a larger m or a smaller t (more message bits).')
  ids = (user_ids[:, None] >> np.arange(b)[None]) & 1
  private = np.stack([
      np.asarray(jax.random.bernoulli(jax.random.fold_in(key, int(u)), 0.5,
                                      (code.k - b,)), np.int64)
      for u in user_ids]) if len(user_ids) else np.zeros((0, code.k - b))
  return code.encode(np.concatenate([ids, private], axis=1).astype(np.int64))


def to_signs(codewords: np.ndarray) -> np.ndarray:
  """Bits 0/1 -> +1/-1 float32 (the vectors FedUV correlates with)."""
  return (1.0 - 2.0 * np.asarray(codewords, np.float32)).astype(np.float32)
