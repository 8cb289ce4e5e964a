"""Vectorised numpy ray casting of a synthetic-world scene.

World frame: x right, y up, z away from the camera; the floor is y = 0 and the back wall is the plane
z = wall_z. The pinhole camera sits at (0, height, 0), looks along +z and is pitched down. Ray
directions are scaled so that their component along the optical axis is 1: the ray parameter t of
any hit is then directly the z-depth, which is what the depth maps store.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLASSES: tuple[str, ...] = ("floor", "wall", "ball", "cube", "cylinder")
SHAPES: tuple[str, ...] = ("ball", "cube", "cylinder")
_FLOOR, _WALL = 0, 1


@dataclass(frozen=True)
class Camera:
    """Pinhole camera at (0, height, 0) looking along +z, pitched down by `pitch` radians."""

    height: float
    pitch: float
    focal: float  # pixels
    size: int  # square image side, pixels

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World-space right, up and forward unit vectors."""
        s, c = np.sin(self.pitch), np.cos(self.pitch)
        return np.array([1.0, 0.0, 0.0]), np.array([0.0, c, s]), np.array([0.0, -s, c])

    def rays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-pixel ray directions (dx [1, S], dy [S, 1], dz [S, 1]), optical-axis component 1.

        The camera only pitches, so dx depends on the column alone and dy, dz on the row alone;
        keeping them as broadcastable vectors saves memory and time.
        """
        coords = (np.arange(self.size) + 0.5 - self.size / 2) / self.focal
        s, c = np.sin(self.pitch), np.cos(self.pitch)
        yc = -coords[:, None]  # image rows grow downwards, camera up is +y
        return coords[None, :], yc * c - s, yc * s + c

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World points [..., 3] -> pixel u, pixel v and z-depth."""
        right, up, fwd = self.axes()
        rel = np.asarray(points, dtype=np.float64) - np.array([0.0, self.height, 0.0])
        z = rel @ fwd
        half = self.size / 2
        return half + self.focal * (rel @ right) / z, half - self.focal * (rel @ up) / z, z


@dataclass(frozen=True)
class Primitive:
    """An object standing on the floor at (x, z)."""

    shape: str  # one of SHAPES
    x: float
    z: float
    radius: float  # ball radius, cube half-side, cylinder radius
    height: float  # total height (a ball's and a cube's are 2 * radius)
    color: tuple[float, float, float]  # linear RGB in [0, 1]
    yaw: float = 0.0  # cube rotation about the vertical axis

    @property
    def center(self) -> np.ndarray:
        return np.array([self.x, self.height / 2, self.z])

    @property
    def footprint(self) -> float:
        """Radius of a floor circle containing the object whatever its yaw."""
        return self.radius * np.sqrt(2.0) if self.shape == "cube" else self.radius


@dataclass(frozen=True)
class Scene:
    """Everything needed to render one image deterministically."""

    camera: Camera
    objects: tuple[Primitive, ...]
    wall_z: float
    light: tuple[float, float, float]  # unit vector towards the light
    ambient: float
    floor_colors: tuple[tuple[float, float, float], tuple[float, float, float]]
    tile: float  # checkerboard tile side, metres
    wall_colors: tuple[tuple[float, float, float], tuple[float, float, float]]  # bottom, top
    panel: float  # wall panel width, metres
    noise_seed: int
    noise_std: float = 2.0  # pixel noise, in 8-bit levels


@dataclass
class Geometry:
    """Result of the ray-casting pass (no shading)."""

    per_object_depth: np.ndarray  # [n, S, S] float32, inf where the ray misses object k
    background_depth: np.ndarray  # [S, 1] float32 depth of floor/wall, per row
    wall_rows: np.ndarray  # [S, 1] bool, rows where the wall is nearer than the floor
    depth: np.ndarray  # [S, S] float32
    instances: np.ndarray  # [S, S] uint16, 0 = floor/wall, k = objects[k - 1]
    semantic: np.ndarray  # [S, S] uint8 ids into CLASSES
    normals: list[tuple[tuple[slice, slice], np.ndarray]]  # per object: (window, [h, w, 3] normals)


def _sphere(o: np.ndarray, dx, dy, dz, p: Primitive):
    ox, oy, oz = o - p.center
    a = dx * dx + dy * dy + dz * dz
    b = 2 * (dx * ox + dy * oy + dz * oz)
    c = ox * ox + oy * oy + oz * oz - p.radius**2
    disc = b * b - 4 * a * c
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / (2 * a)  # the camera is outside, so the near root is the hit
    t = np.where((disc >= 0) & (t > 0), t, np.inf)
    th = np.where(np.isfinite(t), t, 0.0)  # normals only matter where the ray hits
    n = np.stack(np.broadcast_arrays(ox + th * dx, oy + th * dy, oz + th * dz), -1) / p.radius
    return t, n


def _box(o: np.ndarray, dx, dy, dz, p: Primitive):
    cy, sy = np.cos(p.yaw), np.sin(p.yaw)
    axes = (np.array([cy, 0.0, sy]), np.array([0.0, 1.0, 0.0]), np.array([-sy, 0.0, cy]))
    rel = o - p.center
    half = (p.radius, p.height / 2, p.radius)
    t_near = t_far = None
    for e, h in zip(axes, half, strict=True):
        oi, di = rel @ e, dx * e[0] + dy * e[1] + dz * e[2]
        di = np.where(np.abs(di) < 1e-12, 1e-12, di)  # avoid 0/0 in the slab test
        t1, t2 = (-h - oi) / di, (h - oi) / di
        tn, tf = np.minimum(t1, t2), np.maximum(t1, t2)
        if t_near is None:
            t_near, t_far = tn, tf
            normal = -np.sign(di)[..., None] * e
        else:
            better = tn > t_near
            t_near = np.where(better, tn, t_near)
            t_far = np.minimum(t_far, tf)
            normal = np.where(better[..., None], -np.sign(di)[..., None] * e, normal)
    t = np.where((t_far >= t_near) & (t_near > 0), t_near, np.inf)
    return t, normal


def _cylinder(o: np.ndarray, dx, dy, dz, p: Primitive):
    ox, oz = o[0] - p.x, o[2] - p.z
    a = dx * dx + dz * dz
    b = 2 * (dx * ox + dz * oz)
    c = ox * ox + oz * oz - p.radius**2
    disc = b * b - 4 * a * c
    with np.errstate(invalid="ignore", divide="ignore"):
        t_side = (-b - np.sqrt(disc)) / (2 * a)
        y = o[1] + t_side * dy
        t_side = np.where((disc >= 0) & (t_side > 0) & (y >= 0) & (y <= p.height), t_side, np.inf)
        t_top = (p.height - o[1]) / dy  # the camera is above every object: the cap faces it
        rx, rz = ox + t_top * dx, oz + t_top * dz
        t_top = np.where((t_top > 0) & (rx * rx + rz * rz <= p.radius**2), t_top, np.inf)
    side = t_side <= t_top
    t = np.minimum(t_side, t_top)
    th = np.where(np.isfinite(t), t, 0.0)
    n = np.stack(np.broadcast_arrays((ox + th * dx) / p.radius, np.zeros(()), (oz + th * dz) / p.radius), -1)
    n = np.where(side[..., None], n, np.array([0.0, 1.0, 0.0]))
    return t, n


_INTERSECT = {"ball": _sphere, "cube": _box, "cylinder": _cylinder}


def _window(camera: Camera, p: Primitive) -> tuple[slice, slice] | None:
    """Conservative pixel window of an object: projected corners of its world bounding box.

    Every corner lies in front of the camera, so the projection of the (convex) box stays inside
    the hull of the projected corners; the one-pixel pad covers pixel-centre rounding.
    """
    r = p.footprint
    corners = np.array([[p.x + sx * r, y, p.z + sz * r] for sx in (-1, 1) for y in (0, p.height)
                        for sz in (-1, 1)])
    u, v, _ = camera.project(corners)
    c0, c1 = max(int(np.floor(u.min())) - 1, 0), min(int(np.ceil(u.max())) + 1, camera.size)
    r0, r1 = max(int(np.floor(v.min())) - 1, 0), min(int(np.ceil(v.max())) + 1, camera.size)
    return (slice(r0, r1), slice(c0, c1)) if c1 > c0 and r1 > r0 else None


def cast_scene(scene: Scene) -> Geometry:
    """Ray-cast floor, wall and objects; nearest hit wins per pixel."""
    cam, size = scene.camera, scene.camera.size
    dx, dy, dz = cam.rays()
    origin = np.array([0.0, cam.height, 0.0])
    with np.errstate(divide="ignore"):
        t_floor = np.where(dy < 0, cam.height / -dy, np.inf)
    t_wall = scene.wall_z / dz  # dz > 0 for every pixel at the pitches used
    wall_rows = t_wall <= t_floor
    background = np.minimum(t_floor, t_wall).astype(np.float32)

    n = len(scene.objects)
    per_object = np.full((n, size, size), np.inf, dtype=np.float32)
    normals: list[tuple[tuple[slice, slice], np.ndarray]] = []
    for k, prim in enumerate(scene.objects):
        win = _window(cam, prim)
        if win is None:
            normals.append(((slice(0, 0), slice(0, 0)), np.zeros((0, 0, 3))))
            continue
        rows, cols = win
        t, nrm = _INTERSECT[prim.shape](origin, dx[:, cols], dy[rows], dz[rows], prim)
        per_object[k, rows, cols] = t
        normals.append((win, nrm))

    # Depths are compared in float32 so that depth == per_object_depth exactly at instance pixels.
    stack = np.concatenate([np.broadcast_to(background, (1, size, size)), per_object])
    instances = stack.argmin(axis=0).astype(np.uint16)
    depth = np.take_along_axis(stack, instances[None].astype(np.intp), 0)[0]
    shape_class = np.array([_FLOOR] + [CLASSES.index(p.shape) for p in scene.objects], dtype=np.uint8)
    semantic = shape_class[instances]
    semantic[(instances == 0) & wall_rows] = _WALL
    return Geometry(per_object, background, wall_rows, depth, instances, semantic, normals)


def shade(scene: Scene, geo: Geometry) -> np.ndarray:
    """Lambertian shading (+ a faint highlight on objects) -> [S, S, 3] uint8 RGB."""
    cam, size = scene.camera, scene.camera.size
    dx, dy, dz = cam.rays()
    light = np.asarray(scene.light)
    amb = scene.ambient
    t = geo.background_depth.astype(np.float64)
    x, z = (t * dx).astype(np.float32), (t * dz).astype(np.float32)  # floor/wall hit positions
    # Rays above the floor/wall horizon hit the wall, the rest the floor: the wall is a block of top rows.
    split = int(geo.wall_rows.sum())
    image = np.empty((size, size, 3), dtype=np.float32)

    # Floor: checkerboard in world coordinates (shows perspective), soft contact shadows.
    a, b = (np.asarray(c, dtype=np.float32) for c in scene.floor_colors)
    fx, fz = x[split:], z[split:]
    checker = ((np.floor(fx / scene.tile) + np.floor(fz / scene.tile)) % 2)[..., None]
    shadow = np.ones(fx.shape, dtype=np.float32)
    for p in scene.objects:
        # Blob under the object, pushed away from the light; cheap stand-in for shadow rays.
        sx = p.x - light[0] / max(light[1], 0.2) * p.height * 0.4
        sz = p.z - light[2] / max(light[1], 0.2) * p.height * 0.4
        sigma = p.footprint * 1.1
        near = np.nonzero(np.abs(fz[:, 0] - sz) < 3 * sigma)[0]  # floor z depends on the row only
        if near.size:
            r = slice(near[0], near[-1] + 1)
            d2 = (fx[r] - sx) ** 2 + (fz[r] - sz) ** 2
            shadow[r] *= 1 - 0.45 * np.exp(d2 / np.float32(-2 * sigma**2))
    lit = amb + (1 - amb) * max(light[1], 0.0)
    image[split:] = (a + (b - a) * checker) * (shadow[..., None] * np.float32(lit))

    # Wall: vertical colour gradient plus darker seams between panels.
    lo, hi = (np.asarray(c, dtype=np.float32) for c in scene.wall_colors)
    grad = np.clip((cam.height + t[:split] * dy[:split]) / 5.0, 0, 1).astype(np.float32)
    seam = np.abs((x[:split] / scene.panel) % 1.0 - 0.5) > 0.46
    lit = amb + (1 - amb) * max(-light[2], 0.0)
    image[:split] = (lo + (hi - lo) * grad[..., None]) * ((1 - 0.18 * seam[..., None]) * np.float32(lit))

    # Objects: Lambert + ambient + a small Blinn-Phong highlight so that shape reads clearly.
    for k, (p, (win, nrm)) in enumerate(zip(scene.objects, geo.normals, strict=True), 1):
        mask = geo.instances[win] == k
        if not mask.any():
            continue
        nk = nrm[mask]
        rows, cols = win
        view = -np.stack(np.broadcast_arrays(dx[:, cols], dy[rows], dz[rows]), -1)[mask]
        view /= np.linalg.norm(view, axis=-1, keepdims=True)
        half = light + view
        half /= np.linalg.norm(half, axis=-1, keepdims=True)
        diffuse = np.clip(nk @ light, 0, None)
        spec = 0.25 * np.clip(np.sum(nk * half, -1), 0, None) ** 24
        color = np.asarray(p.color) * (amb + (1 - amb) * diffuse)[:, None] + spec[:, None]
        image[win][mask] = color  # image[win] is a view (basic slicing)

    noise = np.random.default_rng(scene.noise_seed).standard_normal((size, size, 3), dtype=np.float32)
    out = image * 255.0 + noise * scene.noise_std + 0.5
    return np.clip(out, 0, 255).astype(np.uint8)


def render_scene(scene: Scene) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Render a scene -> (image uint8 [S,S,3], depth float32 [S,S], instances uint16 [S,S],
    semantic uint8 [S,S], per_object_depth float32 [n,S,S] with inf where object k is missed)."""
    geo = cast_scene(scene)
    return shade(scene, geo), geo.depth, geo.instances, geo.semantic, geo.per_object_depth
