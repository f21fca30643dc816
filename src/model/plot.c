/* plot.c - a loss curve as a PNG: lines drawn into an RGB buffer, written with libpng. No text: the numbers
 * are in the run's JSONL log; the picture shows the shape (train blue, validation red, grid every tenth). */
#include "model.h"

#include <errno.h>
#include <math.h>
#include <png.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PW 800
#define PH 500
#define MARGIN 40

static void pixel(unsigned char *img, int x, int y, const unsigned char *rgb) {
    if (x < 0 || y < 0 || x >= PW || y >= PH) return;
    memcpy(img + ((size_t)y * PW + (size_t)x) * 3, rgb, 3);
}

static void line(unsigned char *img, int x0, int y0, int x1, int y1, const unsigned char *rgb, int thick) {
    int dx = abs(x1 - x0), dy = -abs(y1 - y0), sx = x0 < x1 ? 1 : -1, sy = y0 < y1 ? 1 : -1, err = dx + dy;
    for (;;) {
        for (int a = 0; a < thick; a++)
            for (int b = 0; b < thick; b++) pixel(img, x0 + a, y0 + b, rgb);
        if (x0 == x1 && y0 == y1) break;
        int e2 = 2 * err;
        if (e2 >= dy) {
            err += dy;
            x0 += sx;
        }
        if (e2 <= dx) {
            err += dx;
            y0 += sy;
        }
    }
}

static void series(unsigned char *img, const double *x, const double *y, int64_t n, double xmax, double ymin,
                   double ymax, const unsigned char *rgb) {
    int px = 0, py = 0;
    for (int64_t i = 0; i < n; i++) {
        int cx = MARGIN + (int)((PW - 2 * MARGIN) * (x[i] / xmax));
        int cy = PH - MARGIN - (int)((PH - 2 * MARGIN) * ((y[i] - ymin) / (ymax - ymin)));
        if (i > 0) line(img, px, py, cx, cy, rgb, 2);
        else line(img, cx, cy, cx, cy, rgb, 3);
        px = cx;
        py = cy;
    }
}

moda_status moda_plot_losses(const char *path, const double *tx, const double *ty, int64_t nt, const double *vx,
                             const double *vy, int64_t nv) {
    double xmax = 1, ymin = INFINITY, ymax = -INFINITY;
    for (int64_t i = 0; i < nt; i++) {
        if (tx[i] > xmax) xmax = tx[i];
        if (ty[i] < ymin) ymin = ty[i];
        if (ty[i] > ymax) ymax = ty[i];
    }
    for (int64_t i = 0; i < nv; i++) {
        if (vx[i] > xmax) xmax = vx[i];
        if (vy[i] < ymin) ymin = vy[i];
        if (vy[i] > ymax) ymax = vy[i];
    }
    if (!(ymax > ymin)) {
        ymin = isfinite(ymin) ? ymin - 1 : 0;
        ymax = ymin + 2;
    }
    ymin = floor(ymin * 10) / 10;
    unsigned char *img = malloc((size_t)PW * PH * 3);
    if (!img) return moda_model_fail(MODA_ERR_OUT_OF_MEMORY, "out of memory");
    memset(img, 255, (size_t)PW * PH * 3);
    const unsigned char grid[3] = {225, 225, 225}, axis[3] = {60, 60, 60}, blue[3] = {30, 90, 200},
                        red[3] = {210, 40, 40};
    for (int k = 1; k < 10; k++) {
        int gx = MARGIN + (PW - 2 * MARGIN) * k / 10, gy = MARGIN + (PH - 2 * MARGIN) * k / 10;
        line(img, gx, MARGIN, gx, PH - MARGIN, grid, 1);
        line(img, MARGIN, gy, PW - MARGIN, gy, grid, 1);
    }
    line(img, MARGIN, PH - MARGIN, PW - MARGIN, PH - MARGIN, axis, 1);
    line(img, MARGIN, MARGIN, MARGIN, PH - MARGIN, axis, 1);
    series(img, tx, ty, nt, xmax, ymin, ymax, blue);
    series(img, vx, vy, nv, xmax, ymin, ymax, red);

    FILE *f = fopen(path, "wb");
    if (!f) {
        free(img);
        return moda_model_fail(MODA_ERR_IO, "cannot create %s: %s", path, strerror(errno));
    }
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, NULL, NULL, NULL);
    png_infop info = png ? png_create_info_struct(png) : NULL;
    if (!png || !info || setjmp(png_jmpbuf(png))) {
        png_destroy_write_struct(&png, &info);
        fclose(f);
        free(img);
        return moda_model_fail(MODA_ERR_IO, "libpng failed writing %s", path);
    }
    png_init_io(png, f);
    png_set_IHDR(png, info, PW, PH, 8, PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT,
                 PNG_FILTER_TYPE_DEFAULT);
    png_write_info(png, info);
    for (int y = 0; y < PH; y++) png_write_row(png, img + (size_t)y * PW * 3);
    png_write_end(png, NULL);
    png_destroy_write_struct(&png, &info);
    free(img);
    if (fclose(f) != 0) return moda_model_fail(MODA_ERR_IO, "closing %s failed", path);
    return MODA_OK;
}
