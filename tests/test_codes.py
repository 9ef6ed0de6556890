"""Tests of fedjax_ext.codes: GF(2^m), BCH codes and FedUV codewords."""
import jax
import numpy as np
import pytest

from fedjax_ext import codes


def test_gf16_follows_its_primitive_polynomial():
  field = codes.galois_field(4)
  # alpha^4 = alpha + 1 under x^4 + x + 1; alpha^15 = 1.
  assert field.power(4) == 0b0011
  assert field.power(15) == 1
  # (alpha^3) * (alpha^14) = alpha^17 = alpha^2.
  assert field.mul(field.power(3), field.power(14)) == 0b0100


def test_minimal_polynomials_in_gf16():
  field = codes.galois_field(4)
  assert codes.minimal_polynomial(field, 1) == 0b10011     # x^4 + x + 1
  assert codes.minimal_polynomial(field, 3) == 0b11111     # x^4+x^3+x^2+x+1
  assert codes.minimal_polynomial(field, 5) == 0b111       # x^2 + x + 1
  assert codes.cyclotomic_coset(3, 15) == (3, 6, 9, 12)


def test_bch_15_7_generator_divides_x15_minus_1_and_has_distance_5():
  code = codes.bch_code(4, 2)
  # g = m1 * m3 = x^8 + x^7 + x^6 + x^4 + 1 (the textbook BCH(15,7)).
  assert code.generator == 0b111010001
  assert (code.n, code.k, code.designed_distance) == (15, 7, 5)
  assert codes.poly_mod((1 << 15) | 1, code.generator) == 0
  assert codes.minimum_distance(code) == 5


@pytest.mark.parametrize('m,t,k,d', [(4, 3, 5, 7), (5, 3, 16, 7),
                                     (5, 5, 11, 11)])
def test_brute_force_distance_meets_designed_distance(m, t, k, d):
  code = codes.bch_code(m, t)
  assert code.k == k
  assert codes.minimum_distance(code) == d >= code.designed_distance


def test_bch_63_dimensions_match_the_standard_table():
  ks = {t: codes.bch_code(6, t).k for t in (1, 2, 3, 4, 5, 6, 7, 10, 11, 13,
                                            15)}
  assert ks == {1: 57, 2: 51, 3: 45, 4: 39, 5: 36, 6: 30, 7: 24, 10: 18,
                11: 16, 13: 10, 15: 7}


def test_encoding_is_linear_systematic_and_divisible_by_g():
  code = codes.bch_code(5, 2)
  rng = np.random.default_rng(0)
  a = rng.integers(0, 2, (20, code.k))
  b = rng.integers(0, 2, (20, code.k))
  ca, cb = code.encode(a), code.encode(b)
  np.testing.assert_array_equal(code.encode(a ^ b), ca ^ cb)
  np.testing.assert_array_equal(ca[:, code.n - code.k:], a)  # Systematic.
  for word in ca:
    assert codes.poly_mod(codes.codeword_polynomial(word), code.generator) == 0


def test_bad_codes_raise():
  with pytest.raises(ValueError, match='no message bits'):
    codes.bch_code(4, 8)  # alpha^15 = 1 joins: deg g = 15 = n.
  with pytest.raises(ValueError, match='m in'):
    codes.bch_code(11, 2)
  with pytest.raises(ValueError, match='t'):
    codes.bch_code(4, 0)
  with pytest.raises(ValueError, match='7 bits'):
    codes.bch_code(4, 2).encode(np.zeros((2, 6), np.int64))


def test_user_codewords_are_distinct_far_apart_and_private():
  code = codes.bch_code(6, 11)  # BCH(63, 16), d_min 23.
  key = jax.random.key(0)
  words = codes.user_codewords(code, np.arange(160), 160, key)
  dist = (words[:, None] != words[None]).sum(-1)
  assert dist[~np.eye(160, dtype=bool)].min() >= 23
  # Systematic: the message's first 8 bits are the server's id.
  msg = words[:, code.n - code.k:]
  ids = (msg[:, :8] * (1 << np.arange(8))).sum(1)
  np.testing.assert_array_equal(ids, np.arange(160))
  # Same key, same codeword; another key changes the private bits only.
  np.testing.assert_array_equal(
      codes.user_codewords(code, [7], 160, key)[0], words[7])
  other = codes.user_codewords(code, np.arange(160), 160, jax.random.key(1))
  np.testing.assert_array_equal(other[:, code.n - code.k:][:, :8], msg[:, :8])
  assert (other != words).any(axis=1).mean() > 0.9
  signs = codes.to_signs(words[:2])
  assert set(np.unique(signs)) == {-1.0, 1.0}


def test_user_codewords_reject_mismatched_users():
  code = codes.bch_code(4, 2)  # 7 message bits.
  key = jax.random.key(0)
  with pytest.raises(ValueError, match='message bits'):
    codes.user_codewords(code, np.arange(100), 100, key)  # 7 id bits + 1.
  with pytest.raises(ValueError, match='repeat'):
    codes.user_codewords(code, [1, 1], 4, key)
  with pytest.raises(ValueError, match=r'\[0, 4\)'):
    codes.user_codewords(code, [4], 4, key)
