package org.enfpire.example

import android.os.Bundle
import android.widget.TextView
import androidx.appcompat.app.AppCompatActivity
import com.chaquo.python.PyObject
import com.chaquo.python.Python
import com.chaquo.python.android.AndroidPlatform
import org.json.JSONArray
import org.json.JSONObject
import java.util.concurrent.Executors

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

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        status = TextView(this).also { setContentView(it) }
        if (!Python.isStarted()) Python.start(AndroidPlatform(this))
        enfpire = Python.getInstance().getModule("edge_client.android")
        worker.execute {
            val photo = assets.open("photo.jpg").use { it.readBytes() }
            show(recognizePhoto(photo))
        }
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
        status.text = if (answer.getBoolean("ok")) answer.optString("name", "unknown")
                      else answer.getJSONObject("error").getString("message")
    }

    override fun onDestroy() {
        // stops the dummy scheduler after its started bursts went out whole, and closes the clients
        worker.execute { enfpire.callAttr("close_all") }
        worker.shutdown()
        super.onDestroy()
    }
}
