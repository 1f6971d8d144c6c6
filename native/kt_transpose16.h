/* A 16 x 16 fp32 transpose in zmm registers, shared by the avx512 (native and SIMDe) and amx
 * kernels. The includer defines ZMM(op) (the intrinsic's name: _mm512_op or simde_mm512_op) and the
 * vector type zf. */
#ifndef KT_TRANSPOSE16_H
#define KT_TRANSPOSE16_H

/* In place: r[j] becomes column j of the 16 x 16 matrix whose rows were r[0..16). After the
 * in-lane steps r[4g+c] holds, in 128-bit lane l, column 4l+c of rows 4g..4g+3; two rounds of
 * 128-bit lane shuffles gather the four row groups. */
static inline void transpose16(zf r[16]) {
    zf t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = ZMM(unpacklo_ps)(r[i], r[i + 1]);
        t[i + 1] = ZMM(unpackhi_ps)(r[i], r[i + 1]);
    }
    for (int g = 0; g < 16; g += 4) {
        r[g] = ZMM(shuffle_ps)(t[g], t[g + 2], 0x44);
        r[g + 1] = ZMM(shuffle_ps)(t[g], t[g + 2], 0xee);
        r[g + 2] = ZMM(shuffle_ps)(t[g + 1], t[g + 3], 0x44);
        r[g + 3] = ZMM(shuffle_ps)(t[g + 1], t[g + 3], 0xee);
    }
    for (int c = 0; c < 4; c++) {
        t[c] = ZMM(shuffle_f32x4)(r[c], r[4 + c], 0x88);
        t[4 + c] = ZMM(shuffle_f32x4)(r[c], r[4 + c], 0xdd);
        t[8 + c] = ZMM(shuffle_f32x4)(r[8 + c], r[12 + c], 0x88);
        t[12 + c] = ZMM(shuffle_f32x4)(r[8 + c], r[12 + c], 0xdd);
    }
    for (int c = 0; c < 4; c++) {
        r[c] = ZMM(shuffle_f32x4)(t[c], t[8 + c], 0x88);
        r[8 + c] = ZMM(shuffle_f32x4)(t[c], t[8 + c], 0xdd);
        r[4 + c] = ZMM(shuffle_f32x4)(t[4 + c], t[12 + c], 0x88);
        r[12 + c] = ZMM(shuffle_f32x4)(t[4 + c], t[12 + c], 0xdd);
    }
}

#endif /* KT_TRANSPOSE16_H */
