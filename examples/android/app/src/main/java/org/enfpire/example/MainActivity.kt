package org.enfpire.example

import android.Manifest
import android.os.Bundle
import android.util.Size
import android.widget.TextView
import androidx.activity.result.contract.ActivityResultContracts
import androidx.appcompat.app.AppCompatActivity
import androidx.camera.core.CameraSelector
import androidx.camera.core.ImageAnalysis
import androidx.camera.core.ImageProxy
import androidx.camera.core.resolutionselector.ResolutionSelector
import androidx.camera.core.resolutionselector.ResolutionStrategy
import androidx.camera.lifecycle.ProcessCameraProvider
import androidx.core.content.ContextCompat
import com.chaquo.python.PyObject
import com.chaquo.python.Python
import com.chaquo.python.android.AndroidPlatform
import org.json.JSONArray
import org.json.JSONObject
import java.util.concurrent.Executors
import java.util.concurrent.atomic.AtomicBoolean

/**
 * Calls EnfPire's device side (edge_client.android) through Chaquopy. Every function takes
 * primitives and returns a JSON string: {"ok": true, ...} or {"ok": false, "error": {...}}.
 * The calls block on the network, so they run on a background thread, never the UI thread.
 */
class MainActivity : AppCompatActivity() {
    private val serverUrl = "http://10.0.2.2:8080"   // the host's loopback, seen from the emulator
    private val config = JSONObject().put("dummies", 2).toString()
    private val worker = Executors.newSingleThreadExecutor()
    private lateinit var enfpire: PyObject
    private lateinit var status: TextView
    private val shutter = AtomicBoolean(false)   // set by a tap: recognize the next camera frame
    private val cameraPermission =
        registerForActivityResult(ActivityResultContracts.RequestPermission()) { granted -> if (granted) startCamera() }

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        status = TextView(this).also { setContentView(it) }
        status.setOnClickListener { shutter.set(true) }
        if (!Python.isStarted()) Python.start(AndroidPlatform(this))
        enfpire = Python.getInstance().getModule("edge_client.android")
        worker.execute {
            val photo = assets.open("photo.jpg").use { it.readBytes() }
            show(recognizePhoto(photo))
        }
        cameraPermission.launch(Manifest.permission.CAMERA)
    }

    /**
     * The capture path: CameraX ImageAnalysis hands over 640x480 RGBA frames, so no 12 MP photo
     * and no JPEG is ever made; the model sees 224x224 anyway.
     */
    private fun startCamera() {
        val analysis = ImageAnalysis.Builder()
            .setResolutionSelector(ResolutionSelector.Builder().setResolutionStrategy(ResolutionStrategy(
                Size(640, 480), ResolutionStrategy.FALLBACK_RULE_CLOSEST_HIGHER_THEN_LOWER)).build())
            .setOutputImageFormat(ImageAnalysis.OUTPUT_IMAGE_FORMAT_RGBA_8888)
            .setBackpressureStrategy(ImageAnalysis.STRATEGY_KEEP_ONLY_LATEST)
            .build()
        analysis.setAnalyzer(worker) { image ->
            image.use { if (shutter.getAndSet(false)) show(recognizeFrame(it)) }
        }
        val provider = ProcessCameraProvider.getInstance(this)
        provider.addListener({
            provider.get().bindToLifecycle(this, CameraSelector.DEFAULT_BACK_CAMERA, analysis)
        }, ContextCompat.getMainExecutor(this))
    }

    /** One frame as CameraX delivers it: the RGBA plane, its row stride, the turn that makes it upright. */
    private fun recognizeFrame(image: ImageProxy): JSONObject {
        val plane = image.planes[0]
        val buffer = plane.buffer.apply { rewind() }
        val rgba = ByteArray(buffer.remaining()).also { buffer.get(it) }
        return JSONObject(enfpire.callAttr("recognize_frame", rgba, image.width, image.height, "rgba",
            serverUrl, config, plane.rowStride, image.imageInfo.rotationDegrees).toString())
    }

    /** A photo, when the app bundles a TFLite interpreter for Python. */
    private fun recognizePhoto(jpeg: ByteArray): JSONObject =
        JSONObject(enfpire.callAttr("recognize_jpeg", jpeg, serverUrl, config).toString())

    /** A feature the app computed with its own runtime; modelSha256 is the sha256 of the .tflite it ran. */
    fun recognizeFeature(feature: FloatArray, modelSha256: String): JSONObject {
        val featureJson = JSONArray(feature.map { it.toDouble() }).toString()
        return JSONObject(enfpire.callAttr("recognize_feature", featureJson, serverUrl, config, modelSha256).toString())
    }

    /** The privacy setting's "forget" button: drop the answers kept on the phone. */
    fun forgetAnswers(): Boolean =
        JSONObject(enfpire.callAttr("clear_cache", serverUrl, config).toString()).getBoolean("ok")

    private fun show(answer: JSONObject) = runOnUiThread {
        status.text = if (answer.getBoolean("ok")) answer.optString("name", "unknown") + privacyLine(answer)
                      else answer.getJSONObject("error").getString("message")
    }

    /** The answer's privacy receipt in one line: computed on the phone from public data, never sent. */
    private fun privacyLine(answer: JSONObject): String {
        val receipt = answer.optJSONObject("privacy") ?: return ""
        if (!receipt.optBoolean("request_sent")) return "\nprivacy: answered on the phone, nothing sent"
        return "\nprivacy: %.0f plausible spots; the server's best guess is right %.0f%% of the time".format(
            receipt.getDouble("plausible_spots"), 100 * receipt.getDouble("server_top1_probability"))
    }

    override fun onDestroy() {
        // stops the dummy scheduler after its started bursts went out whole, and closes the clients
        worker.execute { enfpire.callAttr("close_all") }
        worker.shutdown()
        super.onDestroy()
    }
}
